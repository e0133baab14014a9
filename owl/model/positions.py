"""Positions: the decoder's position ids from segment ids (restarting per packed sample), and fixed
sin-cos position embeddings (MAE convention): the Owl2 abstractor's query and key positions, and
the from-scratch init of the ViT's learned positions."""

from __future__ import annotations

import torch


def on_meta_device() -> bool:
    """Whether tensors are being created on the meta device (`load_model` builds there, then
    assigns the weights). Init values computed there are never used, and computing them runs
    torch's Python meta kernels, whose first use imports torch._dynamo: seconds per process
    (BENCHMARKS.md, "Numbers moved out of the code"). Init code skips the math then."""
    return torch.empty(0).device.type == "meta"


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style sin-cos embedding: positions (M,) -> (M, dim), first half sin, second half cos."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_with_cls(dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos over a (grid, grid) patch grid, row-major, with a zero row first for CLS.

    Half the width encodes the column index, half the row index (the MAE convention)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    grid = torch.cat(
        [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1
    )  # (grid*grid, dim)
    return torch.cat([torch.zeros(1, dim), grid], dim=0)  # (1 + grid*grid, dim)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that restart at 0 wherever the segment id changes (packing, padding)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T)
    return index - start_index
