"""LoRA on the decoder attention with peft (Owl1 stage 2: r=8, alpha=32, dropout 0.05, q/v).

Only decoder attention projections get adapters: the ViT and abstractor have modules with the same
short names (q_proj, ...) and stay untouched. After `apply_lora` exactly the LoRA parameters plus
the parameters of `modules_to_save` require grad (the authors' release re-enabled gradients on the
whole LLM after wrapping it; we do not). `modules_to_save` modules are trained in place, not copied.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from owl.model.model import OwlModel

DECODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "k_proj_visual", "v_proj_visual")


def apply_lora(
    model: OwlModel,
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    modules_to_save: Sequence[str] = (),
) -> OwlModel:
    """Inject LoRA adapters in place into `decoder.layers.*.attn.<target>`; freeze the rest.

    modules_to_save: dotted module names (e.g. "abstractor", "decoder.embed_tokens") that stay
    fully trainable."""
    unknown = sorted(set(target_modules) - set(DECODER_ATTENTION))
    if unknown:
        raise ValueError(
            f"LoRA target_modules {unknown} are not decoder attention projections; "
            f"choose from {DECODER_ATTENTION}"
        )
    module_names = dict(model.named_modules())
    missing = sorted(name for name in modules_to_save if name not in module_names)
    if missing:
        raise ValueError(f"modules_to_save {missing} are not modules of the model")
    targets = "|".join(re.escape(t) for t in target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # A string is matched in full against each module name: decoder attention only.
        target_modules=rf"decoder\.layers\.\d+\.attn\.({targets})",
        bias="none",
    )
    inject_adapter_in_model(config, model)
    model.train(model.training)  # new dropout modules start in training mode; follow the model
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    for name in modules_to_save:
        for param in module_names[name].parameters():
            param.requires_grad = True
    return model


def merge_lora(model: OwlModel) -> OwlModel:
    """Fold every adapter into its base weight and remove the wrappers: plain OwlModel names."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent: nn.Module = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad = True
    return model
