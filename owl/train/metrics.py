"""Training metrics: a FLOPs estimate of the model, MFU, and a window that turns counts into rates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from owl.model.config import OwlConfig

# Dense bf16 tensor-core peak per device, by a substring of `torch.cuda.get_device_name()`.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> float | None:
    """bf16 peak of the current CUDA device, or None (CPU, or a device not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flop_terms(
    model: OwlConfig, *, tokens: int, attention_pairs: int, images: int
) -> dict[str, float]:
    """Forward + backward FLOPs of one training step, by part (docs/model.md, "FLOPs and MFU").

    `tokens`: decoder tokens (padding excluded); `attention_pairs`: the sum over samples of the
    squared sample length (each of a sample's tokens attends over the whole sample: causality is
    not halved, as torch's FLOP counter and the usual MFU formula count it); `images`: images
    encoded. A matmul of an (m, k) by a (k, n) is 2 m k n FLOPs forward and twice that backward
    (the input's and the weight's gradients), so 3x forward; the patch embedding's input (the
    pixels) takes no gradient, so 2x. Every weight is counted as trained (the usual MFU
    convention; in Owl2's stage 2 every weight does train). Activation checkpointing's recompute
    is not counted (model FLOPs, not hardware FLOPs). `mam_second_branch` is Owl2's MAM computing
    both key/value branches for every token (`torch.where` selects one): executed, but no part of
    the model's FLOPs, so `model_flops` leaves it out.
    """
    v, a, d = model.vision, model.abstractor, model.decoder
    s, k, w = v.num_tokens, a.num_queries, a.width  # ViT tokens per image (1 + P), queries
    kv = d.num_kv_heads * d.head_dim
    forward = {
        "vision_patch_embed": images * v.num_patches * 2 * v.num_channels * v.patch_size**2 * v.width,
        "vision_linear": images * s * v.num_layers * 2 * (4 * v.width**2 + 2 * v.width * v.mlp_dim),
        "vision_attention": images * v.num_layers * 4 * s * s * v.width,
        # q and o over the K queries, k and v over [queries; ViT tokens], the SwiGLU over the
        # queries; then the projection to the decoder width.
        "abstractor_linear": images
        * (a.num_layers * 2 * (2 * k * w * w + 2 * (k + s) * w * w + 3 * k * w * a.ffn_dim)
           + 2 * k * w * d.hidden),
        "abstractor_attention": images * a.num_layers * 4 * k * (k + s) * w,
        "decoder_linear": tokens
        * (d.num_layers * 2 * (2 * d.hidden**2 + 2 * d.hidden * kv + 3 * d.hidden * d.ffn_dim)
           + 2 * d.hidden * d.vocab_size),
        "decoder_attention": attention_pairs * d.num_layers * 4 * d.hidden,
        "mam_second_branch": tokens * d.num_layers * 2 * 2 * d.hidden * kv
        if d.modality_adaptive
        else 0,
    }  # fmt: skip
    return {
        name: float(flops * (2 if name == "vision_patch_embed" else 3))
        for name, flops in forward.items()
    }


def model_flops(terms: dict[str, float]) -> float:
    """The step's model FLOPs (what MFU divides by time and peak): every term but the MAM's
    unused branch."""
    return sum(v for name, v in terms.items() if name != "mam_second_branch")


def train_flops(model: OwlConfig, *, tokens: int, attention_pairs: int, images: int) -> float:
    """Model FLOPs of one training step (`flop_terms`, `model_flops`)."""
    return model_flops(
        flop_terms(model, tokens=tokens, attention_pairs=attention_pairs, images=images)
    )


def attention_pairs(segment_ids: torch.Tensor) -> int:
    """Sum over the samples of a (B, T) batch (segments k >= 1; 0 = padding) of their squared
    lengths: the (query, key) pairs `flop_terms` counts."""
    pairs = 0
    for row in segment_ids:
        values, counts = torch.unique_consecutive(row, return_counts=True)
        pairs += int((counts[values > 0].long() ** 2).sum())
    return pairs


WINDOW_COUNTS = ("loss_sum", "supervised", "tokens", "samples", "flops")


@dataclass
class Window:
    """Counts since the last log line; `rates()` turns them into per-second numbers."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    loss_sum: float = 0.0
    supervised: int = 0
    tokens: int = 0
    samples: int = 0
    flops: float = 0.0

    def counts(self) -> list[float]:
        return [float(getattr(self, name)) for name in WINDOW_COUNTS]

    @classmethod
    def resumed(cls, saved: dict[str, float] | None, rank: int) -> Window:
        """The window a checkpoint kept open (`saved`: counts summed over ranks, held by rank 0
        alone so that the next all-reduce counts them once), or a new one."""
        if not saved:
            return cls()
        window = cls(started=time.perf_counter() - saved["elapsed_s"], steps=int(saved["steps"]))
        if rank == 0:
            for name in WINDOW_COUNTS:
                setattr(window, name, saved[name])
        return window

    def rates(self, world_size: int) -> dict[str, float]:
        """Per-second numbers over the window; counts are already summed over ranks."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {
            "loss": self.loss_sum / max(self.supervised, 1),
            "tokens_per_s": self.tokens / elapsed,
            "supervised_tokens_per_s": self.supervised / elapsed,
            "samples_per_s": self.samples / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
        }
        peak = peak_flops()
        if peak:
            out["mfu"] = self.flops / elapsed / (peak * world_size)
        return out
