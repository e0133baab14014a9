"""Images that decoders get wrong, built in the tests (no files checked in): 16-bit PNGs, palette
with transparency, CMYK JPEG, a sideways JPEG with an EXIF orientation, bytes after a JPEG's end
marker. Used by tests/unit/test_images.py and the loopback download test."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, RGB or RGBA by the last axis) written by hand: Pillow writes no 48/64-bit
    PNGs."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = array.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def grey16_png(value: int = 0x8000, size: int = 32) -> bytes:
    return png16(np.full((size, size), value, np.uint16))


def rgb16_png(rgb: tuple[int, int, int] = (0x4000, 0x8000, 0xC000), size: int = 32) -> bytes:
    return png16(np.tile(np.array(rgb, np.uint16), (size, size, 1)))


def rgba16_png(rgba: tuple = (0xC000, 0x4000, 0x8000, 0xFFFF), size: int = 32) -> bytes:
    return png16(np.tile(np.array(rgba, np.uint16), (size, size, 1)))


def palette_alpha_png(size: int = 32) -> bytes:
    """Left half: palette entry 0, fully transparent (black underneath); right half: opaque red."""
    image = Image.new("P", (size, size), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 * 3 - 6))
    image.paste(1, (size // 2, 0, size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def cmyk_jpeg(rgb: tuple[int, int, int] = (30, 160, 60), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def sideways_jpeg(width: int = 32, height: int = 16) -> bytes:
    """Stored 32x16 with red left, blue right; EXIF orientation 6 (turn 90 degrees clockwise to
    view): upright it is 16x32 with red on top and blue at the bottom."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def trailing_bytes_jpeg(size: int = 32, num_trailing: int = 2048) -> bytes:
    """A valid JPEG followed by 2 KB of other bytes (cameras and editors append such data)."""
    buf = io.BytesIO()
    image = Image.effect_noise((size, size), 40).convert("RGB")
    Image.blend(image, Image.new("RGB", (size, size), (120, 60, 200)), 0.5).save(buf, "JPEG")
    junk = np.random.default_rng(0).integers(0, 256, num_trailing, np.uint8).tobytes()
    return buf.getvalue() + junk
