"""Image decoding: every kind that decoders get wrong comes out upright 8-bit RGB, or a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from owl.data.image import ImageProblem, checked_image_bytes, decode_image, to_pil
from tests.integration import bad_images


def _pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int32)[xy[1], xy[0]]


def _close(pixel: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> bool:
    return bool(np.abs(pixel - np.array(rgb)).max() <= tol)


@pytest.mark.parametrize("decode", [decode_image, to_pil])
def test_sixteen_bit_pngs_keep_their_values(decode):
    assert _close(_pixel(decode(bad_images.grey16_png(0x8000)), (5, 5)), (128, 128, 128), 1)
    assert _close(_pixel(decode(bad_images.rgb16_png()), (5, 5)), (64, 128, 192), 1)
    assert _close(_pixel(decode(bad_images.rgba16_png()), (5, 5)), (192, 64, 128), 1)


def test_palette_with_transparency_is_composited_over_white():
    image = to_pil(bad_images.palette_alpha_png())
    assert _close(_pixel(image, (4, 16)), (255, 255, 255), 0)
    assert _close(_pixel(image, (28, 16)), bad_images.RED, 0)


def test_exif_orientation_is_applied():
    image = to_pil(bad_images.sideways_jpeg())
    assert image.size == (16, 32)
    assert _close(_pixel(image, (8, 4)), bad_images.RED, 30)
    assert _close(_pixel(image, (8, 28)), bad_images.BLUE, 30)


def test_cmyk_and_trailing_bytes():
    assert _close(_pixel(to_pil(bad_images.cmyk_jpeg()), (5, 5)), (30, 160, 60), 12)
    data = bad_images.trailing_bytes_jpeg()
    assert checked_image_bytes(data) == data  # plain RGB: handed on as it is
    assert to_pil(data).size == (32, 32)


def test_plain_images_pass_unchanged_and_others_become_png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    assert checked_image_bytes(buf.getvalue()) == buf.getvalue()
    normalised = checked_image_bytes(bad_images.grey16_png())
    assert normalised.startswith(b"\x89PNG") and Image.open(io.BytesIO(normalised)).mode == "RGB"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b'{"id": 1, "conversations": []}', "not_an_image"),
        (bad_images.sideways_jpeg()[:300], "truncated_image"),
        (bad_images.grey16_png(size=64), "decompression_bomb"),
    ],
)
def test_unusable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ImageProblem) as info:
        decode_image(data, max_pixels=1000)
    assert info.value.reason == reason


def test_decoding_leaves_the_processs_warning_records_alone():
    """A warning shown once stays shown once across decodes: a `catch_warnings` per image reset
    Python's "once" records, and DeepSpeed's deprecated all-gather printed its warning at every
    training step (150 times in the demo's stage 1)."""
    import warnings

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")

    def library_call() -> None:
        warnings.warn("this call is deprecated", FutureWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            library_call()
            decode_image(buf.getvalue())
    assert [str(w.message) for w in seen] == ["this call is deprecated"]
