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


def _linear_params(model: OwlConfig) -> tuple[int, int, int]:
    """Weights multiplied per token in (vision, abstractor, decoder), embeddings excluded."""
    v, a, d = model.vision, model.abstractor, model.decoder
    vision = v.num_layers * (4 * v.width**2 + 2 * v.width * v.mlp_dim)
    abstractor = a.num_layers * (4 * a.width**2 + 3 * a.width * a.ffn_dim)
    kv = 2 * d.hidden * d.num_kv_heads * d.head_dim
    decoder = (
        d.num_layers * (2 * d.hidden**2 + kv + 3 * d.hidden * d.ffn_dim) + d.hidden * d.vocab_size
    )
    return vision, abstractor, decoder


def train_flops(model: OwlConfig, *, tokens: int, seq_len: int, images: int) -> float:
    """Forward + backward FLOPs (6 per weight per token, plus attention scores) for a step.

    Counts every weight as if trained (the usual MFU convention). `tokens` are decoder tokens,
    `seq_len` the row length (attention cost per token grows with it), `images` images encoded.
    """
    vision, abstractor, decoder = _linear_params(model)
    d = model.decoder
    decoder_flops = 6 * decoder * tokens + 12 * d.num_layers * d.hidden * seq_len * tokens
    vision_tokens = images * model.vision.num_tokens
    vision_flops = 6 * vision * vision_tokens
    vision_flops += (
        12 * model.vision.num_layers * model.vision.width * model.vision.num_tokens * vision_tokens
    )
    abstractor_flops = 6 * abstractor * images * model.abstractor.num_queries
    return float(decoder_flops + vision_flops + abstractor_flops)


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
