"""Visual abstractor: K learnable queries summarise the ViT tokens of one image.

One layer (q = queries, x = image features):
    qn = norm_q(q); xn = norm_k(x)
    attention: queries from qn, keys/values over [qn; xn] (one softmax over itself + the image)
    y = qn + o_proj(attn)                        # residual from the *normalised* queries
    y = y + w2(ffn_norm(silu(w1 norm2(y)) * w3 norm2(y)))
norm_q, norm_k and norm2 use `norm_eps` (1e-5 in the authors' releases), ffn_norm `layer_norm_eps`
(1e-6). Owl2 adds fixed sin-cos embeddings (buffers, recomputed, never saved): 1-D over query indices added
to the query and key inputs, 2-D over the patch grid (a zero row for CLS) added to the image part of
the key input. Values get none. The output is projected to the decoder width and a learned
end-of-image vector is appended: K + 1 tokens per image. Linear layers are
`owl.model.linear.Linear` (nn.Linear whose fp32 CPU products go through oneDNN, or MKL on an
Intel CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from owl.model.attention import FullAttention
from owl.model.config import AbstractorConfig, VisionConfig
from owl.model.linear import Linear
from owl.model.positions import on_meta_device, sincos_1d, sincos_2d_with_cls


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the inner activation."""

    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.width, cfg.ffn_dim)
        self.w3 = Linear(cfg.width, cfg.ffn_dim)
        self.ffn_norm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layer_norm_eps)
        self.w2 = Linear(cfg.ffn_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_norm(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.norm_k = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = FullAttention(cfg.width, cfg.num_heads, "abstractor")
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = AbstractorMLP(cfg)

    def forward(
        self,
        queries: torch.Tensor,  # (N, K, W)
        image: torch.Tensor,  # (N, L, W) ViT tokens
        query_pos: torch.Tensor,  # (K, W) zeros for Owl1
        image_pos: torch.Tensor,  # (L, W) zeros for Owl1
    ) -> torch.Tensor:
        qn = self.norm_q(queries)
        xn = self.norm_k(image)
        q_with_pos = qn + query_pos.to(qn.dtype)
        keys = torch.cat([q_with_pos, xn + image_pos.to(xn.dtype)], dim=1)  # (N, K + L, W)
        values = torch.cat([qn, xn], dim=1)  # (N, K + L, W)
        y = qn + self.attn(q_with_pos, keys, values)
        return y + self.mlp(self.norm2(y))


class Abstractor(nn.Module):
    """ViT tokens (N, 1 + P, W) -> visual tokens for the decoder (N, K + 1, D)."""

    def __init__(
        self,
        cfg: AbstractorConfig,
        vision: VisionConfig,
        decoder_hidden: int,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        if vision.width != cfg.width:
            raise ValueError(
                f"abstractor.width ({cfg.width}) must equal vision.width ({vision.width}): keys "
                "and values run over [queries; image tokens] in one sequence"
            )
        meta = on_meta_device()  # load_model: no init math, the weights are assigned next
        self.queries = nn.Parameter(
            torch.empty(cfg.num_queries, cfg.width)
            if meta
            else torch.randn(cfg.num_queries, cfg.width) * 0.02
        )
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_layers))
        self.proj = Linear(cfg.width, decoder_hidden)
        self.end_of_image = nn.Parameter(
            torch.empty(decoder_hidden) if meta else torch.randn(decoder_hidden) * 0.02
        )
        self._num_queries, self._width = cfg.num_queries, cfg.width
        self._grid = vision.image_size // vision.patch_size
        self._positional = cfg.positional_embeddings
        # Fixed, recomputed from the config: not part of the state dict.
        self.register_buffer("query_pos", torch.empty(0), persistent=False)  # (K, W)
        self.register_buffer("image_pos", torch.empty(0), persistent=False)  # (1 + P, W)
        self.reset_positions()

    def reset_positions(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the fixed positional buffers, e.g. after building on the meta device."""
        device = device or self.queries.device
        num_keys = 1 + self._grid * self._grid
        if torch.device(device).type == "meta":  # load_model recomputes them on the real device
            self.query_pos = torch.empty(self._num_queries, self._width, device=device)
            self.image_pos = torch.empty(num_keys, self._width, device=device)
            return
        if self._positional:
            query_pos = sincos_1d(self._width, torch.arange(self._num_queries))
            image_pos = sincos_2d_with_cls(self._width, self._grid)
        else:
            query_pos = torch.zeros(self._num_queries, self._width)
            image_pos = torch.zeros(num_keys, self._width)
        self.query_pos = query_pos.to(device)
        self.image_pos = image_pos.to(device)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        num_images = image.shape[0]
        x = self.queries.to(image.dtype).expand(num_images, -1, -1)  # (N, K, W)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, image, self.query_pos, self.image_pos, use_reentrant=False)
            else:
                x = layer(x, image, self.query_pos, self.image_pos)
        x = self.proj(x)  # (N, K, D)
        end = self.end_of_image.to(x.dtype).expand(num_images, 1, -1)  # (N, 1, D)
        return torch.cat([x, end], dim=1)  # (N, K + 1, D)
