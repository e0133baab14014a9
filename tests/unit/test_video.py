"""Video as frames (owl.data.video) and videos in instruction data (tokenize_instructions).

Real files: mp4 (MPEG-4) and webm (VP9) written and decoded by the FFmpeg inside PyAV. A red
square slides across a white frame, so where it is in a decoded frame says which frame it is.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from owl import IMAGE_TOKEN_ID
from owl.data.image import preprocess_images
from owl.data.tokenize import EncoderSpec
from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from owl.data.video import (
    VideoProblem,
    encode_video,
    expand_videos,
    frame_indices,
    frame_png_bytes,
    media_order,
    sample_frames,
)
from pipelines.steps.tokenize_instructions import encode_conversation_batch

NUM_FRAMES = 12
SIDE = 48


def _frame(i: int) -> Image.Image:
    """Frame i: a red square whose left edge is at x = 3 * i."""
    image = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((3 * i, 16, 3 * i + 9, 25), fill=(220, 40, 40))
    return image


def _which_frame(image: Image.Image) -> int:
    """The index of the frame `image` shows, from where its red square is."""
    array = np.asarray(image).astype(int)
    red = (array[..., 0] > 150) & (array[..., 1] < 110)
    return round(np.nonzero(red)[1].min() / 3)


@pytest.fixture(scope="module", params=["mp4", "webm"])
def video(request: pytest.FixtureRequest) -> bytes:
    return encode_video([_frame(i) for i in range(NUM_FRAMES)], request.param)


def test_frame_indices_are_the_authors_uniform_segments() -> None:
    # mplug_owl_video get_index: start = int(seg / 2), start + round(seg * k), seg = (n - 1) / N
    assert frame_indices(12, 4) == [1, 4, 7, 9]
    assert frame_indices(100, 4) == [12, 37, 62, 86]
    assert frame_indices(2, 4) == [0, 0, 0, 1]  # fewer frames than asked: repeated
    assert frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        frame_indices(0, 4)


def test_sampled_frames_are_the_chosen_ones_in_order(video: bytes) -> None:
    frames = sample_frames(video, 4)
    assert [f.size for f in frames] == [(SIDE, SIDE)] * 4
    assert all(f.mode == "RGB" for f in frames)
    assert [_which_frame(f) for f in frames] == frame_indices(NUM_FRAMES, 4)
    every = sample_frames(video, NUM_FRAMES)  # the authors' rule repeats some even then
    assert [_which_frame(f) for f in every] == frame_indices(NUM_FRAMES, NUM_FRAMES)
    # Stored as lossless PNGs of exactly those pixels.
    pngs = frame_png_bytes(video, 4)
    assert [np.asarray(Image.open(io.BytesIO(p))).tolist() for p in pngs] == [
        np.asarray(f).tolist() for f in frames
    ]


def test_frames_are_turned_upright() -> None:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # a phone held upright records a display rotation
        wide = Image.new("RGB", (64, 32), (255, 255, 255))
        ImageDraw.Draw(wide).rectangle((0, 0, 15, 31), fill=(220, 40, 40))  # red on the left
        output.mux(stream.encode(av.VideoFrame.from_image(wide)))
        output.mux(stream.encode())
    [frame] = sample_frames(buffer.getvalue(), 1)
    assert frame.size == (32, 64)  # turned a quarter, counter-clockwise: the left is the bottom
    array = np.asarray(frame).astype(int)
    assert array[60, 16, 1] < 110 and array[4, 16, 1] > 200


def test_unusable_videos_raise_with_a_reason() -> None:
    video = encode_video([_frame(i) for i in range(NUM_FRAMES)], "mp4")
    cases = {
        "empty_file": b"",
        "not_a_video": b"this is text, not a video" * 10,
        "truncated_video": video[:-100],  # the frames' index (moov) is there, their data is not
        "no_video_stream": video[: len(video) // 2],  # FFmpeg finds no video track in it
    }
    for reason, data in cases.items():
        with pytest.raises(VideoProblem) as info:
            sample_frames(data, 4)
        assert info.value.reason == reason, (reason, str(info.value))
    with pytest.raises(VideoProblem) as info:
        sample_frames(video, 4, max_pixels=SIDE * SIDE - 1)
    assert info.value.reason == "decompression_bomb"


def test_placeholders_expand_to_one_image_slot_per_frame() -> None:
    text = "<image> then <video>\nand <|video|> <|image|>"
    assert media_order([text, "<video>"]) == ["image", "video", "video", "image", "video"]
    assert expand_videos("<video>\nWhich way?", 3) == "<|image|><|image|><|image|>\nWhich way?"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(["Which way does it move? left right", "Yes."] * 20, 300, out)
    return out


@pytest.fixture(scope="module")
def encoder(bpe_dir) -> EncoderSpec:
    return EncoderSpec.of(load_tokenizer(bpe_dir))


def _row(sample_id: str, question: str, images: list[str], videos: list[str]) -> dict:
    turns = [["user", question], ["assistant", "Right."]]
    return {"sample_id": sample_id, "turns": json.dumps(turns), "images": json.dumps(images),
            "source": f"test:{sample_id}", "videos": json.dumps(videos)}  # fmt: skip


def test_instruction_videos_become_frames_in_slot_order(encoder: EncoderSpec, tmp_path) -> None:
    movie = tmp_path / "move.mp4"
    movie.write_bytes(encode_video([_frame(i) for i in range(NUM_FRAMES)]))
    picture = tmp_path / "a.png"
    _frame(0).resize((20, 20)).save(picture)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 4)
    rows = [
        _row("mixed", "<video> <image>\nWhich way?", [str(picture)], [str(movie)]),
        _row("missing", "<video>Which way?", [], [str(tmp_path / "none.mp4")]),
        _row("mismatch", "<video><video>Which way?", [], [str(movie)]),
        _row("broken", "<|video|>Which way?", [], [str(tmp_path / "broken.mp4")]),
        _row("plain", "<image>Which way?", [str(picture)], []),
    ]
    table = encode_conversation_batch(
        pa.Table.from_pylist(rows), encoder=encoder, variant="owl2", num_visual_tokens=2,
        max_length=200, system=None, num_frames=3,
    )  # fmt: skip
    result = {r["sample_id"]: r for r in table.to_pylist()}
    assert {k: r["drop_reason"] for k, r in result.items()} == {
        "mixed": "", "missing": "missing_video", "mismatch": "placeholder_video_mismatch",
        "broken": "not_a_video", "plain": "",
    }  # fmt: skip
    mixed = result["mixed"]
    assert mixed["kind"] == "multimodal" and len(mixed["images"]) == 4  # 3 frames, then the image
    assert mixed["input_ids"].count(IMAGE_TOKEN_ID) == 4 * 2
    shown = [_which_frame(Image.open(io.BytesIO(b))) for b in mixed["images"][:3]]
    assert shown == frame_indices(NUM_FRAMES, 3)
    assert mixed["images"][3] == picture.read_bytes()
    # A frame is an image like any other from here: the same preprocessing gives the same pixels.
    frames = sample_frames(movie.read_bytes(), 3)
    assert preprocess_images(mixed["images"][:3], 16).equal(preprocess_images(frames, 16))
    assert result["plain"]["images"] == [picture.read_bytes()]


def test_a_benchmark_video_is_asked_as_its_frames(bpe_dir, tmp_path) -> None:
    """Evaluation: one image placeholder per image and per frame, in the order the pixels come."""
    from owl.data.tokenize import encode_prompt
    from owl.eval.benchmarks import read_benchmark
    from owl.eval.generate import load_images
    from owl.eval.prompts import prompt_turns
    from owl.model import get_config

    (tmp_path / "move.webm").write_bytes(
        encode_video([_frame(i) for i in range(NUM_FRAMES)], "webm")
    )
    _frame(0).save(tmp_path / "a.png")
    record = {"id": "1", "type": "text", "images": ["a.png"], "videos": ["move.webm"],
              "question": "Which way?", "answer": "right"}  # fmt: skip
    (tmp_path / "bench.jsonl").write_text(json.dumps(record) + "\n")
    [parsed] = read_benchmark(tmp_path / "bench.jsonl")
    [turn] = prompt_turns(parsed, "<|image|>", num_frames=3)
    assert turn.text == "<|image|>" * 4 + "Which way?"
    cfg = get_config("debug-tiny")
    pixels = load_images(parsed, cfg, num_frames=3)
    expected = preprocess_images(
        [(tmp_path / "a.png").read_bytes(), *sample_frames((tmp_path / "move.webm").read_bytes(), 3)],
        cfg.vision.image_size, cfg.image_mode,
    )  # fmt: skip
    assert pixels.shape[0] == 4 and pixels.equal(expected)
    assert load_images(parsed, cfg, blank=True, num_frames=3).shape[0] == 4
    tokenizer = load_tokenizer(bpe_dir)
    ids = encode_prompt(tokenizer, [turn], variant="owl2", num_visual_tokens=5)
    assert ids.count(IMAGE_TOKEN_ID) == 4 * 5
