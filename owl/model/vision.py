"""Vision encoder: a CLIP ViT (ViT-L/14 at paper size).

Layout: bias-free patch convolution, a learned CLS vector and learned positions over CLS + patches,
a LayerNorm before the blocks, pre-LayerNorm blocks with quick-GELU MLPs, and a LayerNorm after
the blocks applied to *every* token (the abstractor reads all tokens, not only CLS). Linear layers
are `owl.model.linear.Linear` (nn.Linear whose fp32 CPU products go through oneDNN, or MKL on an
Intel CPU).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from owl.model.attention import FullAttention
from owl.model.config import VisionConfig
from owl.model.linear import Linear
from owl.model.positions import on_meta_device, sincos_2d_with_cls


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The GELU approximation OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = FullAttention(cfg.width, cfg.num_heads, "vision")
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h)
        return x + self.mlp(self.norm2(x))


def _initial_positions(cfg: VisionConfig) -> torch.Tensor:
    """Init of the learned positions (CLS + patches) for training from scratch (pretrained CLIP
    weights replace it): 2-D sin-cos over the patch grid, zero for CLS, when the width allows it,
    else N(0, width^-0.5) as CLIP initialises them.

    Not N(0, 0.02): patch features start at ~unit scale, so positions 50x weaker would leave the
    encoder nearly blind to where things are until training grows them (the demo's accuracy with
    each: BENCHMARKS.md, "The demo")."""
    grid = cfg.image_size // cfg.patch_size
    if on_meta_device():  # load_model: the weights are assigned next
        return torch.empty(cfg.num_tokens, cfg.width)
    if cfg.width % 4 == 0:
        return sincos_2d_with_cls(cfg.width, grid)
    return torch.randn(cfg.num_tokens, cfg.width) * cfg.width**-0.5


class VisionEncoder(nn.Module):
    """Images (N, 3, S, S) -> token features (N, 1 + patches, W), CLS first."""

    def __init__(self, cfg: VisionConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"vision.image_size ({cfg.image_size}) must be a multiple of "
                f"vision.patch_size ({cfg.patch_size})"
            )
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = nn.Conv2d(
            cfg.num_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        meta = on_meta_device()  # load_model: no init math, the weights are assigned next
        self.class_embedding = nn.Parameter(
            torch.empty(cfg.width) if meta else torch.randn(cfg.width) * 0.02
        )
        self.position_embedding = nn.Parameter(_initial_positions(cfg))
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.cfg.num_channels, size, size):
            raise ValueError(
                f"images must have shape (N, {self.cfg.num_channels}, {size}, {size}) for this "
                f"model; got {tuple(images.shape)}. Preprocess with "
                f"owl.data.image.preprocess_images(..., size={size})"
            )
        dtype = self.patch_embed.weight.dtype
        patches = self.patch_embed(images.to(dtype))  # (N, W, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (N, P, W)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)  # (N, 1, W)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding  # (N, 1 + P, W)
        x = self.pre_norm(x)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.post_norm(x)  # (N, 1 + P, W)
