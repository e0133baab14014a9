"""Image preprocessing, in one place for training, evaluation and chat alike.

CLIP normalisation. Two ways to make an image square before it is resized to `size` x `size`:
- `pad`: pad the shorter side with the mean colour, keeping the whole image centred (how the
  authors trained Owl2), then resize;
- `resize`: resize straight to the square (aspect ratio not kept, nothing cropped).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "resize")


def to_pil(image: bytes | Image.Image) -> Image.Image:
    """Decode encoded bytes (JPEG, PNG, ...) or take a PIL image; always RGB."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected encoded image bytes or a PIL image, got {type(image).__name__}")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_images(
    images: Sequence[bytes | Image.Image], size: int, mode: Literal["pad", "resize"] = "pad"
) -> torch.Tensor:
    """Images -> normalised pixels (N, 3, size, size) float32, in the order given."""
    if mode not in MODES:
        raise ValueError(f"image mode must be one of {MODES}, got {mode!r}")
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    mean_colour = tuple(int(round(c * 255)) for c in CLIP_MEAN)
    pixels = []
    for image in images:
        pil = to_pil(image)
        if mode == "pad":
            pil = pad_to_square(pil, mean_colour)  # type: ignore[arg-type]
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(pil, dtype=np.float32) / 255.0  # (S, S, 3)
        pixels.append(torch.from_numpy((array - mean) / std).permute(2, 0, 1))  # (3, S, S)
    if not pixels:
        return torch.zeros(0, 3, size, size)
    return torch.stack(pixels)  # (N, 3, S, S)
