"""Parameter counts per component, from a model built on the meta device (nothing allocated)."""

from __future__ import annotations

from typing import Any

from owl.model.config import OwlConfig
from owl.model.weights import meta_model


def summarize(cfg: OwlConfig) -> dict[str, Any]:
    """{"name", "variant", "num_visual_tokens", "params": {component: count}, "total_params"}.

    Components: vision, abstractor, decoder (embeddings, layers, norm, lm_head) and, with the
    modality-adaptive module, `decoder.visual_copies` (the `*_visual` parameters, counted inside
    decoder too)."""
    model = meta_model(cfg)
    params: dict[str, int] = {}
    for name, param in model.named_parameters():  # tied weights are listed once
        component = name.split(".")[0]
        params[component] = params.get(component, 0) + param.numel()
        if "_visual" in name:
            params["decoder.visual_copies"] = params.get("decoder.visual_copies", 0) + param.numel()
    total = sum(count for key, count in params.items() if "." not in key)
    return {
        "name": cfg.name,
        "variant": cfg.variant,
        "num_visual_tokens": cfg.num_visual_tokens,
        "params": params,
        "total_params": total,
    }
