"""Image decoding and preprocessing, in one place for data steps, training, evaluation and chat.

Decoding (`decode_image`): every image that enters a shard goes through it once. The bytes are
decoded fully by Pillow (the declared size is checked against `max_pixels` first: the
decompression-bomb guard) and normalised to 8-bit RGB:
- EXIF orientation applied (a phone photo stored sideways is turned upright);
- 16-bit samples scaled to 8 bits (not clipped: `convert("RGB")` on a 16-bit grey PNG gives white);
- alpha (RGBA, LA, palette + transparency) composited over white, as img2dataset does;
- CMYK and other modes converted by Pillow (Adobe's inverted CMYK JPEGs included);
- bytes after a JPEG's end marker ignored (many cameras and editors append some).
Bytes that are not a usable image raise `ImageProblem` with a reason key (`IMAGE_REASONS`), which
the steps count as a drop. `checked_image_bytes` returns the original bytes when they need no
normalisation (plain 8-bit RGB or grey, upright) and a lossless PNG of the normalised image
otherwise, so downstream decoders (img2dataset's OpenCV, `to_pil`) all see the same pixels.

CLIP normalisation. Two ways to make an image square before it is resized to `size` x `size`:
- `pad`: pad the shorter side with the mean colour, keeping the whole image centred (how the
  authors trained Owl2), then resize;
- `resize`: resize straight to the square (aspect ratio not kept, nothing cropped).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

# torch is imported where pixels become tensors: the data steps (and job validation, through
# owl.data.filters) decode images without it.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "resize")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit
_EXIF_ORIENTATION = 0x0112
# Why bytes are not a usable image: the reason keys steps count drops under.
IMAGE_REASONS = ("empty_file", "not_an_image", "truncated_image", "decompression_bomb")
_PLAIN_MODES = ("RGB", "L")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAGICS = (_PNG_MAGIC, b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
# Sizes are checked against `max_pixels` here, so Pillow's warning below its own error limit says
# nothing more. Ignored once at import: a `catch_warnings` per image resets every "print once"
# record of the process, so a library's deprecation warning was printed again at every step.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.Image")


class ImageProblem(ValueError):
    """Bytes that are not a usable image; `reason` is one of IMAGE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image with its header read (no pixels decoded yet), size checked against `max_pixels`."""
    if not data:
        raise ImageProblem("empty_file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageProblem("decompression_bomb", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 (PIL raises many types for bytes it cannot parse)
        # An image's magic bytes whose header does not parse: cut short, most likely.
        reason = "truncated_image" if data.startswith(_MAGICS) else "not_an_image"
        raise ImageProblem(reason, " ".join(str(exc).split())[:200]) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageProblem("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
    return image


def _load(image: Image.Image) -> None:
    """Decode every pixel (a truncated file raises here, not at open)."""
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise ImageProblem("truncated_image", " ".join(str(exc).split())[:200]) from exc
    if image.size[0] < 1 or image.size[1] < 1:
        raise ImageProblem("not_an_image", f"size {image.size}")


def _check_complete(data: bytes) -> None:
    """Pillow decodes a PNG cut right before its IEND chunk without complaint: refuse it too."""
    if data.startswith(_PNG_MAGIC) and data.rfind(b"IEND") == -1:
        raise ImageProblem("truncated_image", "PNG without its IEND chunk")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block: treat as upright)
        return 1


def _needs_normalising(image: Image.Image, data: bytes) -> bool:
    """Whether other decoders (OpenCV in img2dataset) could see other pixels than we do: anything
    but an upright 8-bit RGB or grey JPEG or PNG without transparency."""
    if image.format not in ("JPEG", "PNG") or image.mode not in _PLAIN_MODES:
        return True
    if image.format == "PNG" and data[24:25] != b"\x08":  # IHDR bit depth (16-bit RGB opens as RGB)
        return True
    return "transparency" in image.info or _orientation(image) != 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as upright 8-bit RGB (see the module docstring)."""
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image)
        if mode.startswith("I;16") or array.max(initial=0) > 255:  # 16-bit samples: keep the top 8
            array = array.astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    transparent = "transparency" in image.info and image.mode in ("L", "RGB")
    if image.mode in ("P", "PA") or transparent:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> upright 8-bit RGB image, or ImageProblem (see the module docstring)."""
    image = _open(bytes(data), max_pixels)
    _load(image)
    _check_complete(bytes(data))
    return _to_rgb(image)


def checked_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """`data` if it decodes to plain upright 8-bit RGB or grey as it is, else a PNG of the
    normalised image; ImageProblem if it is not a usable image. Decodes once."""
    image = _open(bytes(data), max_pixels)
    _load(image)
    _check_complete(bytes(data))
    if not _needs_normalising(image, bytes(data)):
        return bytes(data)
    out = io.BytesIO()
    _to_rgb(image).save(out, format="PNG")
    return out.getvalue()


def to_pil(image: bytes | Image.Image) -> Image.Image:
    """Decode encoded bytes (JPEG, PNG, ...) or take a PIL image; always upright 8-bit RGB."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected encoded image bytes or a PIL image, got {type(image).__name__}")
    return _to_rgb(image)


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
    import torch

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
