"""Which parameters train in which stage, and the AdamW groups.

Each variant names the groups it trains in stage 1 and stage 2, as its paper describes
(`owl.model.variants`, `stage_groups`): Owl1 trains vision + abstractor, then LoRA adapters on
the LLM; Owl2 vision + abstractor + the decoder's visual copies, then everything.
`train_abstractor_in_stage2` adds the abstractor to a stage 2 that leaves it out.

Groups, by parameter name: `vision.*`, `abstractor.*`, `lora` (names containing `lora_`),
`decoder_visual` (decoder names containing `_visual`), `decoder_text` (the rest of `decoder.*`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from owl.model.variants import VARIANTS
from owl.train.config import TrainConfig

GROUPS = ("vision", "abstractor", "decoder_text", "decoder_visual", "lora")

_VIT_BLOCK = re.compile(r"^vision\.layers\.(\d+)\.")


def lora_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of `owl.model.lora.apply_lora` from the training config."""
    return {
        "r": cfg.lora.r,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "target_modules": tuple(cfg.lora.targets),
    }


def param_group(name: str) -> str:
    """The group a parameter belongs to, from its name."""
    if "lora_" in name:
        return "lora"
    for prefix in ("vision", "abstractor"):
        if name.startswith(prefix + "."):
            return prefix
    if name.startswith("decoder."):
        return "decoder_visual" if "_visual" in name else "decoder_text"
    raise ValueError(f"parameter {name!r} is in no known group; expected vision/abstractor/decoder")


def trainable_groups(
    variant: str, stage: int, *, train_abstractor_in_stage2: bool, trainable: str = "paper"
) -> frozenset[str]:
    if variant not in VARIANTS or stage not in (1, 2):
        raise ValueError(
            f"no training recipe for variant={variant!r} stage={stage}; "
            f"use {'/'.join(VARIANTS)}, 1/2"
        )
    if trainable == "all":
        return frozenset(GROUPS) - {"lora"}
    groups = VARIANTS[variant].stage_groups[stage - 1]
    if stage == 2 and train_abstractor_in_stage2:
        groups = groups | {"abstractor"}
    return groups


def select_trainable(
    model: nn.Module,
    variant: str,
    stage: int,
    *,
    train_abstractor_in_stage2: bool = False,
    lora: dict[str, Any] | None = None,
    trainable: str = "paper",
) -> dict[str, dict[str, int]]:
    """Set `requires_grad` for this stage; return {group: {"trainable": n, "total": n}} (elements).

    Owl1 stage 2 first wraps the decoder's target projections with LoRA (`owl.model.lora
    .apply_lora`, keyword arguments from `lora`), so `model` is modified in place.
    """
    groups = trainable_groups(
        variant, stage, train_abstractor_in_stage2=train_abstractor_in_stage2, trainable=trainable
    )
    if "lora" in groups:
        from owl.model.lora import apply_lora

        apply_lora(model, **(lora or {}))
    table = {g: {"trainable": 0, "total": 0} for g in GROUPS}
    for name, param in model.named_parameters():
        group = param_group(name)
        param.requires_grad_(group in groups)
        table[group]["total"] += numel(param)
        table[group]["trainable"] += numel(param) if param.requires_grad else 0
    return table


def select_for_stage(model: nn.Module, variant: str, cfg: TrainConfig) -> dict[str, dict[str, int]]:
    """`select_trainable` with everything taken from the stage's config (stage, `trainable`,
    LoRA, the Owl1 abstractor switch): the one entry point the training loop, the step's
    manifest table and the memory plan all use."""
    return select_trainable(
        model,
        variant,
        cfg.stage,
        train_abstractor_in_stage2=cfg.train_abstractor_in_stage2,
        lora=lora_kwargs(cfg),
        trainable=cfg.trainable,
    )


def planned_model(model_cfg: Any, cfg: TrainConfig) -> tuple[nn.Module, dict[str, dict[str, int]]]:
    """The stage's model built on the meta device (shapes only, nothing allocated) with its
    trainable selection applied (LoRA injected where the stage uses it), and the table."""
    from owl.model.weights import meta_model

    model = meta_model(model_cfg)
    return model, select_for_stage(model, model_cfg.variant, cfg)


def shape(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (its local data is then a
    flat shard and the full shape is `ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


def numel(param: torch.Tensor) -> int:
    """A parameter's full element count, also when ZeRO-3 has partitioned it."""
    return int(getattr(param, "ds_numel", param.numel()))


def format_table(table: dict[str, dict[str, int]]) -> str:
    """The trainable-parameter table as aligned text, for the log."""
    lines = [f"{'group':<16}{'trainable':>14}{'total':>14}"]
    for group, row in table.items():
        if row["total"]:
            lines.append(f"{group:<16}{row['trainable']:>14,}{row['total']:>14,}")
    trainable = sum(r["trainable"] for r in table.values())
    total = sum(r["total"] for r in table.values())
    lines.append(f"{'all':<16}{trainable:>14,}{total:>14,}")
    return "\n".join(lines)


def lr_scale(name: str, cfg: TrainConfig, num_vit_layers: int) -> float:
    """Learning-rate multiplier of one parameter relative to `cfg.optimizer.lr`.

    ViT: block i of L gets `decay ** (L - i)`, the embeddings below block 0 `decay ** (L + 1)`,
    the final norm 1. Abstractor: `abstractor_lr / lr` when set.
    """
    group, opt = param_group(name), cfg.optimizer
    if group == "abstractor" and opt.abstractor_lr > 0:
        return opt.abstractor_lr / opt.lr
    if group != "vision" or opt.vit_layer_decay == 1.0:
        return 1.0
    block = _VIT_BLOCK.match(name)
    if block:
        depth = num_vit_layers - int(block.group(1))
    elif name.startswith("vision.post_norm"):
        depth = 0
    else:  # patch/position/class embeddings and the pre-norm
        depth = num_vit_layers + 1
    return opt.vit_layer_decay**depth


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters.

    Weight decay only on matrices (ndim >= 2); biases, norms and other vectors get none. One
    group per distinct (lr, weight decay), so layer-wise decay gives one group per ViT depth.
    """
    num_vit_layers = 1 + max(
        (int(m.group(1)) for n, _ in model.named_parameters() if (m := _VIT_BLOCK.match(n))),
        default=-1,
    )
    buckets: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = cfg.optimizer.lr * lr_scale(name, cfg, num_vit_layers)
        decay = cfg.optimizer.weight_decay if len(shape(param)) >= 2 else 0.0
        buckets.setdefault((lr, decay), []).append(param)
    if not buckets:
        raise ValueError("no trainable parameters: check the stage and variant")
    return [
        {"params": params, "lr": lr, "weight_decay": decay}
        for (lr, decay), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    ]
