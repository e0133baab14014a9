"""Filter rules for caption data: pure functions, one reason string per rule that rejects a sample.

The filter step applies them per sample (`sample_problem`), then removes exact duplicates across
the whole dataset (`duplicate_keys`), and counts every removal under `filter.<reason>`.
`sniff_image_problem` names bytes that are not a usable image (the download step decodes each
download with `owl.data.image.checked_image_bytes` before img2dataset sees it).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from owl.data.image import ImageProblem, checked_image_bytes

_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_TAG_RE = re.compile(r"<[^>]{0,200}>")
_SPACE_RE = re.compile(r"\s+")
# NUL and the other C0/C1 control characters (tab and newlines are whitespace, collapsed anyway).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class FilterRules:
    """Thresholds of the caption-data filter. A `None` threshold turns that rule off."""

    min_side: int = 0  # of the source image, pixels
    max_aspect_ratio: float | None = None  # long side / short side of the source image
    min_caption_words: int = 1
    max_caption_words: int = 256
    min_caption_chars: int = 1
    max_caption_chars: int = 2048
    strip_urls: bool = True
    strip_html: bool = True
    min_similarity: float | None = None  # CLIP image-text similarity (LAION `similarity`)
    max_punsafe: float | None = None  # probability of unsafe content (LAION `punsafe`)
    max_pwatermark: float | None = None  # probability of a watermark (LAION `pwatermark`)
    similarity_col: str = "similarity"
    punsafe_col: str = "punsafe"
    pwatermark_col: str = "pwatermark"
    # Language rule: minimum share of ASCII among the caption's letters (a cheap "is English" test).
    min_ascii_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio}: must be >= 1")
        if self.min_caption_words > self.max_caption_words:
            raise ValueError("min_caption_words must be <= max_caption_words")
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError("min_caption_chars must be <= max_caption_chars")


def clean_caption(text: str | None, *, strip_urls: bool = True, strip_html: bool = True) -> str:
    """Caption with control characters (NUL...), HTML tags/entities and URLs removed and
    whitespace collapsed."""
    if not text:
        return ""
    text = _CONTROL_RE.sub(" ", text)
    if strip_html:
        text = html.unescape(_TAG_RE.sub(" ", text))
    if strip_urls:
        text = _URL_RE.sub(" ", text)
    return _SPACE_RE.sub(" ", text).strip()


def ascii_letter_ratio(text: str) -> float:
    """Share of ASCII characters among the letters of `text` (1.0 when it has no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    return sum(c.isascii() for c in letters) / len(letters)


def caption_problem(caption: str, rules: FilterRules) -> str | None:
    """Why a (cleaned) caption is rejected, or None."""
    if not caption.strip():
        return "caption_empty"
    num_words = len(caption.split())
    if num_words < rules.min_caption_words:
        return "caption_min_words"
    if num_words > rules.max_caption_words:
        return "caption_max_words"
    if len(caption) < rules.min_caption_chars:
        return "caption_min_chars"
    if len(caption) > rules.max_caption_chars:
        return "caption_max_chars"
    if rules.min_ascii_ratio is not None and ascii_letter_ratio(caption) < rules.min_ascii_ratio:
        return "language"
    return None


def size_problem(width: int, height: int, rules: FilterRules) -> str | None:
    """Why an image of this source size is rejected, or None."""
    if min(width, height) < rules.min_side:
        return "min_side"
    ratio = rules.max_aspect_ratio
    if ratio is not None and max(width, height) > ratio * min(width, height):
        return "max_aspect_ratio"
    return None


def score_problem(row: Mapping[str, Any], rules: FilterRules) -> str | None:
    """Why the score columns reject a sample, or None. Missing columns and null scores pass."""
    similarity = row.get(rules.similarity_col)
    if _below(similarity, rules.min_similarity):
        return "similarity"
    if _below(rules.max_punsafe, row.get(rules.punsafe_col)):
        return "punsafe"
    if _below(rules.max_pwatermark, row.get(rules.pwatermark_col)):
        return "pwatermark"
    return None


def _below(value: float | None, bound: float | None) -> bool:
    """value < bound, False when either is missing."""
    return value is not None and bound is not None and value < bound


def sample_problem(
    row: Mapping[str, Any], width: int, height: int, rules: FilterRules
) -> tuple[str, str | None]:
    """(cleaned caption, reason it is rejected or None) for one sample.

    `width`/`height` are the source image's size; `row` holds the caption and the score columns.
    """
    caption = clean_caption(
        row.get("caption"), strip_urls=rules.strip_urls, strip_html=rules.strip_html
    )
    reason = size_problem(width, height, rules) or caption_problem(caption, rules)
    return caption, reason or score_problem(row, rules)


def duplicate_keys(table: pa.Table, column: str) -> set[str]:
    """Keys of the rows whose `column` value already appeared on a row with a smaller key.

    `table` has a string `key` column (globally unique, ordered) and `column`; keeping the smallest
    key makes the result independent of the order in which shards were processed.
    """
    if table.num_rows == 0:
        return set()
    first = table.group_by(column).aggregate([("key", "min")]).column("key_min")
    is_first = pc.is_in(table.column("key"), value_set=first)
    return set(pc.filter(table.column("key"), pc.invert(is_first)).to_pylist())


def sniff_image_problem(data: bytes, max_pixels: int) -> str | None:
    """Why bytes are not a usable image, or None: "empty file", "not an image", "decompression
    bomb" (declared size over `max_pixels`, found before decoding), "truncated image" (the pixels
    do not decode to the end). Decodes fully (`owl.data.image.checked_image_bytes`)."""
    try:
        checked_image_bytes(data, max_pixels)
    except ImageProblem as exc:
        return exc.reason.replace("_", " ")
    return None


# img2dataset / urllib failure messages -> readable reason keys (first match wins).
_DOWNLOAD_REASONS = (
    (re.compile(r"HTTP Error (\d{3})"), None),  # -> download.<status code>
    (re.compile(r"timed out", re.IGNORECASE), "timeout"),
    (re.compile(r"Connection refused"), "connection_refused"),
    (re.compile(r"Connection reset|Remote end closed"), "connection_reset"),
    (re.compile(r"Name or service not known|name resolution|getaddrinfo|nodename"), "dns"),
    (re.compile(r"No such file or directory"), "file_not_found"),
    (re.compile(r"SSL|CERTIFICATE", re.IGNORECASE), "ssl"),
    (re.compile(r"unknown url type|no host given", re.IGNORECASE), "bad_url"),
    (re.compile(r"^empty file$"), "empty_file"),
    (re.compile(r"^truncated image$"), "truncated_image"),
    (re.compile(r"^decompression bomb$|^image area too large$"), "decompression_bomb"),
    (re.compile(r"^not an image$|^Image decoding error$"), "not_an_image"),
    (re.compile(r"^image too small$"), "too_small"),
    (re.compile(r"^aspect ratio too large$"), "aspect_ratio"),
    (re.compile(r"X-Robots-Tag"), "robots_disallowed"),
    (re.compile(r"^hash mismatch$"), "hash_mismatch"),
)


def download_reason(message: str) -> str:
    """The `download.<reason>` key for an img2dataset status message ("success" for successes)."""
    if message == "success":
        return "success"
    for pattern, reason in _DOWNLOAD_REASONS:
        match = pattern.search(message)
        if match:
            return f"download.{reason or match.group(1)}"
    return "download.other"
