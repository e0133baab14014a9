"""`FullAttention`: multi-head attention with biased q/k/v/o projections and no mask or
positions, the vision encoder's self-attention and the abstractor's cross-attention (the decoder's
attention, with RoPE, grouped KV heads and the modality-adaptive module, is its own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from owl.model.linear import Linear


class FullAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, section: str) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(
                f"{section}.width ({width}) must be divisible by {section}.num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.o_proj = Linear(width, width)

    def forward(
        self, query_in: torch.Tensor, key_in: torch.Tensor, value_in: torch.Tensor
    ) -> torch.Tensor:
        batch, num_queries, width = query_in.shape  # (N, Q, W); keys and values (N, L, W)
        head_dim = width // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, ., W) -> (N, h, ., d)
            return t.view(batch, t.shape[1], self.num_heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(query_in)), heads(self.k_proj(key_in)), heads(self.v_proj(value_in))
        )  # (N, h, Q, d): every query sees every key
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_queries, width))
