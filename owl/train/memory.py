"""The memory plan of a training stage: GPU memory per worker, before anything starts.

Model states follow DeepSpeed's own accounting for mixed-precision Adam (the one its
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` use, without
offload), extended to frozen parameters, which hold only their 16-bit copy:

| ZeRO | 16-bit weights | 16-bit grads | fp32 grads + master + Adam m, v | gathered layer |
|------|----------------|--------------|---------------------------------|----------------|
| 0    | 2 P            | 2 T          | 16 T                            |                |
| 1    | 2 P            | 2 T          | 16 T / N                        |                |
| 2    | 2 P            | 2 T / N      | 16 T / N                        |                |
| 3    | 2 P / N        |              | 16 T / N                        | 4 L            |

P parameters, T trainable ones (after the stage's selection, LoRA included), N workers, L the
largest module's own parameters (ZeRO-3 gathers one at a time, 16-bit weights + grads). With every
parameter trainable this is DeepSpeed's estimate exactly (tests/unit/test_memory_plan.py).

Activations: what autograd keeps for the backward of one micro-batch, counted per op from the
model's code (element counts per token below; bf16, so 2 bytes each), for rows packed full
(`micro_batch_size * max_length` tokens) and the most images a row can hold. Attention is assumed
memory-efficient (SDPA flash / mem-efficient kernels on GPU: no T x T scores kept).

- decoder layer, per token: 11 h + 4 f (norms 2 h, projections' input h, attention q, k, v
  (after grouped-KV repeat) and output 4 h plus o_proj's input h, post-norm 2 h, MLP input h and
  4 f); Owl2's modality-adaptive norms add h each (13 h + 4 f);
- logits, per token: the logits (2 B, held by the loop until the backward) and the fp32
  log-softmax the cross entropy keeps (4 B) per vocabulary entry;
- ViT layer, per token: 9 W + 3 M; abstractor layer, per image: 8 K W + 2 (1 + P) W +
  4 (K + 1 + P) W + 5 K F.
With activation checkpointing each checkpointed layer keeps only its input (h or W per token),
and one layer's full activations are live again while its backward runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from owl.train.config import TrainConfig

GIB = 1 << 30
ACTIVATION_BYTES = 2  # bf16 on GPU


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU (worker) of one training stage."""

    total_params: int
    trainable_params: int
    largest_layer_params: int
    num_workers: int
    zero_stage: int
    weights: float
    gradients: float
    optimizer: float
    gathered_layer: float
    activations: float
    activation_checkpointing: bool

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered_layer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    def gib(self) -> dict[str, float]:
        return {
            "model_states_gib": self.model_states / GIB,
            "activations_gib": self.activations / GIB,
            "total_gib": self.total / GIB,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.gib()}


def model_state_bytes(
    total: int, trainable: int, largest_layer: int, *, num_workers: int, zero_stage: int
) -> tuple[float, float, float, float]:
    """(16-bit weights, 16-bit grads, fp32 optimizer states, gathered layer) bytes per GPU."""
    n = max(1, num_workers)
    weights = 2 * total / (n if zero_stage >= 3 else 1)
    grads = 0.0 if zero_stage >= 3 else 2 * trainable / (n if zero_stage >= 2 else 1)
    optimizer = 16 * trainable / (n if zero_stage >= 1 else 1)
    gathered = 4 * largest_layer if zero_stage >= 3 else 0.0
    return weights, grads, optimizer, gathered


def parameter_counts(model: Any) -> tuple[int, int, int]:
    """(total, trainable, largest module's own) parameter counts; shared parameters once."""
    from owl.train.stages import numel

    params = {id(p): p for p in model.parameters()}
    total = sum(numel(p) for p in params.values())
    trainable = sum(numel(p) for p in params.values() if p.requires_grad)
    largest = max(
        (sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return total, trainable, largest


def activation_bytes(
    model_cfg: Any, cfg: TrainConfig, dtype_bytes: int = ACTIVATION_BYTES
) -> tuple[float, float]:
    """(kept, recomputed) bytes for one micro-batch (see the module docstring): what the forward
    leaves for the backward (the logits the loop holds included), and, with activation
    checkpointing, the largest layer's activations that are live again while its backward runs
    (0 without). `dtype_bytes`: 2 for bf16 training, 4 for fp32."""
    dec, vis, abst = model_cfg.decoder, model_cfg.vision, model_cfg.abstractor
    batch = cfg.batch
    tokens = batch.micro_batch_size * batch.max_length
    images_per_row = min(batch.max_images_per_row, batch.max_length // model_cfg.num_visual_tokens)
    images = batch.micro_batch_size * images_per_row
    h, f = dec.hidden, dec.ffn_dim
    decoder_layer = 11 * h + 4 * f + (2 * h if dec.modality_adaptive else 0)  # per token
    vit_tokens = 1 + (vis.image_size // vis.patch_size) ** 2
    vit_layer = 9 * vis.width + 3 * vis.mlp_dim  # per token
    k, w = abst.num_queries, abst.width
    abstractor_layer = (  # per image
        8 * k * w + 2 * vit_tokens * w + 4 * (k + vit_tokens) * w + 5 * k * abst.ffn_dim
    )
    # The logits (held by the loop until the backward) and the fp32 log-softmax the loss keeps
    # per vocabulary entry; the final norm (2 h) and lm_head's input (h).
    head_bytes = tokens * (dec.vocab_size * (dtype_bytes + 4) + 3 * h * dtype_bytes)
    if not cfg.memory.activation_checkpointing:
        kept = (
            tokens * dec.num_layers * decoder_layer
            + images * vit_tokens * vis.num_layers * vit_layer
            + images * abst.num_layers * abstractor_layer
        )
        return kept * dtype_bytes + head_bytes, 0.0
    # Checkpointed layers keep their inputs: the hidden states (and the ViT tokens the
    # abstractor's layers share).
    kept = (
        tokens * dec.num_layers * h
        + images * vit_tokens * vis.num_layers * vis.width
        + images * (abst.num_layers * k * w + vit_tokens * w)
    )
    recomputed = max(
        tokens * decoder_layer, images * vit_tokens * vit_layer, images * abstractor_layer
    )
    return kept * dtype_bytes + head_bytes, recomputed * dtype_bytes


def plan_memory(model_cfg: Any, cfg: TrainConfig) -> MemoryPlan:
    """The stage's memory plan per GPU, from the model built on the meta device with this
    stage's trainable selection (`owl.train.stages.planned_model`)."""
    from owl.train.stages import planned_model

    model, _ = planned_model(model_cfg, cfg)
    total, trainable, largest = parameter_counts(model)
    weights, grads, optimizer, gathered = model_state_bytes(
        total,
        trainable,
        largest,
        num_workers=cfg.resources.num_workers,
        zero_stage=cfg.memory.zero_stage,
    )
    return MemoryPlan(
        total_params=total,
        trainable_params=trainable,
        largest_layer_params=largest,
        num_workers=cfg.resources.num_workers,
        zero_stage=cfg.memory.zero_stage,
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        gathered_layer=gathered,
        activations=sum(activation_bytes(model_cfg, cfg)),
        activation_checkpointing=cfg.memory.activation_checkpointing,
    )


def check_fits(step: str, plan: MemoryPlan, gpu_memory_gib: float) -> None:
    """ValueError (one line, what to change) when the plan exceeds `gpu_memory_gib` (> 0)."""
    if gpu_memory_gib <= 0 or plan.total <= gpu_memory_gib * GIB:
        return
    hints = []
    if plan.zero_stage < 3:
        hints.append("memory.zero_stage: 3")
    if not plan.activation_checkpointing:
        hints.append("memory.activation_checkpointing: true")
    hints += ["a smaller batch.micro_batch_size or batch.max_length", "more resources.num_workers"]
    raise ValueError(
        f"{step}: the memory plan needs {plan.total / GIB:.1f} GiB per GPU (model states "
        f"{plan.model_states / GIB:.1f} + activations {plan.activations / GIB:.1f}) but "
        f"memory.gpu_memory_gib is {gpu_memory_gib:g}; try {', '.join(hints)}"
    )
