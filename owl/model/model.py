"""The composed model: ViT -> abstractor -> visual tokens spliced into the LLaMA decoder sequence.

`input_ids` carry the images as runs of `cfg.num_visual_tokens` slots equal to `owl.IMAGE_TOKEN_ID`
(the tokenizer expands each placeholder); the model overwrites each run with one image's K + 1
visual embeddings and marks those positions as visual (modality 1) for the MAM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from owl import IMAGE_TOKEN_ID
from owl.model.abstractor import Abstractor
from owl.model.config import OwlConfig
from owl.model.decoder import Decoder, KVCache, SegmentLayout
from owl.model.generate import generate as generate_tokens
from owl.model.generate import stream as stream_tokens
from owl.model.positions import positions_from_segments
from owl.model.vision import VisionEncoder


def segment_mask(
    query_segments: torch.Tensor, key_segments: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """Boolean attention mask (B, 1, Tq, S): causal and within the same segment.

    Query i sits at absolute position offset + i (offset = tokens already in the KV cache). Padding
    (segment 0) only sees padding, which always includes itself, so no row is fully masked and
    SDPA never produces NaN for padded queries."""
    num_queries, num_keys = query_segments.shape[1], key_segments.shape[1]
    device = key_segments.device
    query_pos = torch.arange(num_queries, device=device) + offset
    causal = torch.arange(num_keys, device=device)[None, :] <= query_pos[:, None]  # (Tq, S)
    same = query_segments[:, :, None] == key_segments[:, None, :]  # (B, Tq, S)
    return (same & causal)[:, None]


def count_image_slots(modality: torch.Tensor, num_visual_tokens: int) -> int:
    """Number of images the slot runs in `modality` (B, T) stand for; ValueError on a broken run."""
    padded = F.pad(modality.to(torch.int8), (1, 1))  # runs never touch across rows
    edges = torch.diff(padded.flatten())
    starts = torch.nonzero(edges == 1).flatten()
    ends = torch.nonzero(edges == -1).flatten()
    lengths = (ends - starts).tolist()
    broken = [n for n in lengths if n % num_visual_tokens]
    if broken:
        raise ValueError(
            f"found a run of {broken[0]} image slots (IMAGE_TOKEN_ID) that is not a multiple of "
            f"num_visual_tokens={num_visual_tokens}: expand every image placeholder to exactly "
            f"{num_visual_tokens} slots"
        )
    return sum(lengths) // num_visual_tokens


def _init_weights(module: nn.Module) -> None:
    """Init for training from scratch: weights N(0, 1/fan_in), zero biases.

    At 7B widths this is LLaMA's N(0, 0.02) (4096 ** -0.5 = 0.016); at small widths (the demo's
    64-128) a fixed 0.02 would start every attention nearly uniform, and the abstractor's queries
    would all read the same average of the image for hundreds of steps (the demo's loss with each:
    BENCHMARKS.md, "Numbers moved out of the code").
    """
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        weight = module.weight
        fan_in = weight[0].numel() if not isinstance(module, nn.Embedding) else weight.shape[1]
        nn.init.normal_(weight, std=fan_in**-0.5)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class OwlModel(nn.Module):
    """mPLUG-Owl (variant owl1) / mPLUG-Owl2 (variant owl2)."""

    def __init__(self, cfg: OwlConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision, cfg.activation_checkpointing)
        self.abstractor = Abstractor(
            cfg.abstractor, cfg.vision, cfg.decoder.hidden, cfg.activation_checkpointing
        )
        self.decoder = Decoder(cfg.decoder, cfg.activation_checkpointing)
        self.apply(_init_weights)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) -> visual tokens (N, K + 1, D)."""
        return self.abstractor(self.vision(images))

    def embed(
        self, input_ids: torch.Tensor, images: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) + images (N, 3, S, S) -> embeddings (B, T, D), modality (B, T) bool."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}"
            )
        modality = input_ids == IMAGE_TOKEN_ID  # (B, T)
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(modality, 0))  # (B, T, D)
        num_given = 0 if images is None else images.shape[0]
        has_slots = bool(modality.any())
        num_in_ids = count_image_slots(modality, self.cfg.num_visual_tokens) if has_slots else 0
        if num_in_ids != num_given:
            raise ValueError(
                f"input_ids hold {num_in_ids} image(s) (runs of {self.cfg.num_visual_tokens} "
                f"IMAGE_TOKEN_ID slots) but {num_given} image(s) were given"
            )
        if num_given == 0:
            if self.training:
                # Run the image path on an empty batch: the vision and abstractor modules (and any
                # ZeRO-3 gather hooks on them) are called exactly as in a batch with images, and
                # their parameters receive (zero) gradients. Costs nothing: N = 0.
                size = self.cfg.vision.image_size
                empty = embeds.new_zeros(0, self.cfg.vision.num_channels, size, size)
                embeds = embeds + self.encode_images(empty).sum().to(embeds.dtype)
            return embeds, modality
        visual = self.encode_images(images).to(embeds.dtype)  # (N, K + 1, D)
        # masked_scatter fills slots row by row, left to right: the order images are given in.
        return embeds.masked_scatter(modality[..., None], visual), modality

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T) and all the batch's images (N, 3, S, S).

        segment_ids (B, T): 0 = padding, k >= 1 = the k-th sample packed in the row; attention stays
        within a segment and default positions restart at each segment. Without segment_ids every
        row is one causal sequence. Attention runs per segment (`SegmentLayout`), not under a
        (T, T) mask: a packed row costs what its samples cost alone."""
        embeds, modality = self.embed(input_ids, images)
        layout = None
        if segment_ids is not None:
            if segment_ids.shape != input_ids.shape:
                raise ValueError(
                    f"segment_ids shape {tuple(segment_ids.shape)} must equal input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
            layout = SegmentLayout(segment_ids)
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
                position_ids = position_ids.expand_as(input_ids)
        return self.decoder(embeds, modality, position_ids, layout)

    def forward_cached(
        self,
        input_ids: torch.Tensor,  # (B, Tq): the new tokens only
        images: torch.Tensor | None,
        position_ids: torch.Tensor,  # (B, Tq)
        cache: KVCache,
        key_segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One incremental step for generation: logits (B, Tq, V); the cache grows by Tq.

        key_segments (B, cache.length + Tq): segments of cached + new tokens when the batch has
        padding; None when it has none (plain causal prefill, or one new token sees everything)."""
        embeds, modality = self.embed(input_ids, images)
        num_new = input_ids.shape[1]
        mask = None
        if key_segments is not None:
            mask = segment_mask(key_segments[:, -num_new:], key_segments, offset=cache.length)
        elif cache.length > 0 and num_new > 1:
            raise ValueError("several new tokens after a prefix need key_segments for the mask")
        return self.decoder(embeds, modality, position_ids, mask, cache)

    def generate(
        self,
        input_ids: list[list[int]],
        images: list[torch.Tensor] | None = None,
        **options: Any,
    ) -> list[list[int]]:
        """New tokens per sample (EOS excluded). Batched with left padding; images[i] is
        (n_i, 3, S, S) for sample i, n_i may be 0.
        Options (owl.model.generate.decode): max_new_tokens (required), temperature (0 = greedy),
        top_p, eos_token_id, seed, use_cache."""
        return generate_tokens(self, input_ids, images, **options)

    def stream(
        self, input_ids: list[int], images: torch.Tensor | None = None, **options: Any
    ) -> Iterator[int]:
        """Yield new tokens of one sample as they are produced (for chat); options as in
        `generate`."""
        return stream_tokens(self, input_ids, images, **options)
