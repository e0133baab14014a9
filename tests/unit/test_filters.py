import io

import pyarrow as pa
import pytest
from PIL import Image

from owl.data.filters import (
    FilterRules,
    ascii_letter_ratio,
    caption_problem,
    clean_caption,
    download_reason,
    duplicate_keys,
    sample_problem,
    score_problem,
    size_problem,
    sniff_image_problem,
)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(width: int = 16, height: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def test_clean_caption_strips_html_urls_and_spaces():
    text = "<b>A red</b> &amp; blue  circle https://x.com/a.jpg see www.foo.org\n"
    assert clean_caption(text) == "A red & blue circle see"
    assert clean_caption(text, strip_urls=False, strip_html=False) == (
        "<b>A red</b> &amp; blue circle https://x.com/a.jpg see www.foo.org"
    )
    assert clean_caption(None) == ""


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("", "caption_empty"),
        ("   \t", "caption_empty"),
        ("one", "caption_min_words"),
        ("two words " * 20, "caption_max_words"),
        ("a b", "caption_min_chars"),
        ("fine caption here", None),
    ],
)
def test_caption_problem(caption, reason):
    rules = FilterRules(min_caption_words=2, max_caption_words=10, min_caption_chars=5)
    assert caption_problem(caption, rules) == reason


def test_language_rule_uses_ascii_ratio():
    rules = FilterRules(min_ascii_ratio=0.8)
    assert ascii_letter_ratio("hello") == 1.0
    assert ascii_letter_ratio("123") == 1.0
    assert caption_problem("кот на крыше", rules) == "language"
    assert caption_problem("a cat on the roof", rules) is None


def test_size_problem_checks_min_side_then_aspect():
    rules = FilterRules(min_side=10, max_aspect_ratio=2.0)
    assert size_problem(9, 100, rules) == "min_side"
    assert size_problem(50, 20, rules) == "max_aspect_ratio"
    assert size_problem(40, 20, rules) is None
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        FilterRules(max_aspect_ratio=0.5)


def test_score_thresholds_skip_missing_columns_and_nulls():
    rules = FilterRules(min_similarity=0.3, max_punsafe=0.5, max_pwatermark=0.8)
    assert score_problem({"similarity": 0.2}, rules) == "similarity"
    assert score_problem({"similarity": 0.31, "punsafe": 0.9}, rules) == "punsafe"
    assert score_problem({"pwatermark": 0.81}, rules) == "pwatermark"
    assert score_problem({"similarity": None, "punsafe": 0.1}, rules) is None
    assert score_problem({}, rules) is None
    assert score_problem({"similarity": 0.0}, FilterRules()) is None


def test_sample_problem_returns_cleaned_caption():
    rules = FilterRules(min_side=8)
    assert sample_problem({"caption": "<i>a cat</i>"}, 10, 10, rules) == ("a cat", None)
    assert sample_problem({"caption": "a cat"}, 4, 10, rules) == ("a cat", "min_side")
    assert sample_problem({"caption": "<p> </p>"}, 10, 10, rules) == ("", "caption_empty")


def test_duplicate_keys_keeps_smallest_key_whatever_the_row_order():
    table = pa.table({"key": ["003", "001", "002", "004"], "image": ["x", "x", "y", "x"]})
    assert duplicate_keys(table, "image") == {"003", "004"}
    assert duplicate_keys(table.slice(0, 0), "image") == set()


def test_sniff_image_problem_names_bad_bytes():
    good_png, good_jpeg = _png(8, 8), _jpeg()
    assert sniff_image_problem(good_png, 1000) is None
    assert sniff_image_problem(good_jpeg, 1000) is None
    assert sniff_image_problem(b"", 1000) == "empty file"
    assert sniff_image_problem(b"<html>not found</html>", 1000) == "not an image"
    assert sniff_image_problem(good_jpeg[: len(good_jpeg) // 2], 1000) == "truncated image"
    assert sniff_image_problem(good_png[:-12], 1000) == "truncated image"
    assert sniff_image_problem(_png(2000, 2000), 1_000_000) == "decompression bomb"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("HTTP Error 404: File not found", "download.404"),
        ("HTTP Error 503: Service Unavailable", "download.503"),
        ("<urlopen error [Errno 111] Connection refused>", "download.connection_refused"),
        ("The read operation timed out", "download.timeout"),
        ("<urlopen error timed out>", "download.timeout"),
        (
            "<urlopen error [Errno 2] No such file or directory: '/x.png'>",
            "download.file_not_found",
        ),
        ("not an image", "download.not_an_image"),
        ("Image decoding error", "download.not_an_image"),
        ("truncated image", "download.truncated_image"),
        ("decompression bomb", "download.decompression_bomb"),
        ("empty file", "download.empty_file"),
        ("image too small", "download.too_small"),
        ("something new", "download.other"),
        ("success", "success"),
    ],
)
def test_download_reason(message, reason):
    assert download_reason(message) == reason


def test_control_characters_never_reach_a_caption():
    assert clean_caption("a red\x00 square\x07 on\x1bblue") == "a red square on blue"
    assert clean_caption("\x00\x00") == ""
