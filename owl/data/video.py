"""Video files as a sequence of frames, each frame an image slot (as mPLUG-Owl2 treats video).

A video (mp4, webm, avi, ... anything the FFmpeg inside PyAV demuxes) becomes `num_frames`
frames sampled uniformly over its length: the frame count is read from the container's packets
(no decoding), the chosen indices are those of the authors' video processor (X-PLUG/mPLUG-Owl,
mplug_owl_video/processing_mplug_owl.py `get_index`: the middle of each of `num_frames` equal
segments; 4 frames by default), and the stream is decoded only up to the last chosen frame.
Each frame is turned upright (the stream's display rotation, as phones record) and returned as
8-bit RGB; from there it is an image like any other and goes through the same preprocessing
(`owl.data.image.preprocess_images`) in training, evaluation and chat.

In text, a video placeholder (`<|video|>` or `<video>`) stands for one video; `expand_videos`
replaces it by one image placeholder per frame, so templates and tokenization see images only.
Bytes that are not a usable video raise `VideoProblem` (a `ImageProblem`, so the steps count it
as a drop under its reason, `VIDEO_REASONS`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from PIL import Image

from owl.data.image import MAX_IMAGE_PIXELS, ImageProblem
from owl.data.templates import PLACEHOLDER_RE

# The authors' video processor samples 4 frames per video (its `num_frames` default).
DEFAULT_NUM_FRAMES = 4
VIDEO_PLACEHOLDERS = ("<|video|>", "<video>")
VIDEO_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in VIDEO_PLACEHOLDERS))
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
# Why bytes are not a usable video: the reason keys steps count drops under.
VIDEO_REASONS = ("empty_file", "not_a_video", "no_video_stream", "truncated_video",
                 "decompression_bomb")  # fmt: skip


class VideoProblem(ImageProblem):
    """Bytes that are not a usable video; `reason` is one of VIDEO_REASONS."""


def frame_indices(num_available: int, num_frames: int) -> list[int]:
    """`num_frames` indices into `num_available` frames, uniform: the middle of each of
    `num_frames` equal segments (the authors' `get_index`). Fewer frames than asked repeat."""
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"need >= 1 frame to sample from and to sample, got {num_available}, "
                         f"{num_frames}")  # fmt: skip
    segment = (num_available - 1) / num_frames
    start = int(segment / 2)
    return [min(num_available - 1, start + round(segment * i)) for i in range(num_frames)]


def _open(data: bytes):  # -> av.container.InputContainer (av is imported on use)
    import av

    if not data:
        raise VideoProblem("empty_file")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError) as exc:
        raise VideoProblem("not_a_video", " ".join(str(exc).split())[:200]) from exc


def _count_frames(data: bytes, max_pixels: int) -> int:
    """Frames of the first video stream, counted from its packets (no decoding)."""
    import av

    with _open(data) as container:
        if not container.streams.video:
            raise VideoProblem("no_video_stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoProblem("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as exc:
            raise VideoProblem("truncated_video", " ".join(str(exc).split())[:200]) from exc


def _upright(frame) -> Image.Image:  # frame: av.VideoFrame
    image = frame.to_image().convert("RGB")
    rotation = int(frame.rotation or 0)  # degrees counter-clockwise, as PIL's rotate takes them
    return image.rotate(rotation, expand=True) if rotation % 360 else image


def sample_frames(
    data: bytes, num_frames: int = DEFAULT_NUM_FRAMES, max_pixels: int = MAX_IMAGE_PIXELS
) -> list[Image.Image]:
    """`num_frames` frames of the video in `data`, sampled uniformly, upright 8-bit RGB, in
    order; VideoProblem if the bytes are not a usable video."""
    import av

    num_available = _count_frames(bytes(data), max_pixels)
    if num_available == 0:
        raise VideoProblem("truncated_video", "no frame in the video stream")
    wanted = frame_indices(num_available, num_frames)
    picked: dict[int, Image.Image] = {}
    with _open(bytes(data)) as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    picked[index] = _upright(frame)
                if index >= wanted[-1]:
                    break
        except av.FFmpegError as exc:
            raise VideoProblem("truncated_video", " ".join(str(exc).split())[:200]) from exc
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise VideoProblem("truncated_video", f"frame {missing[0]} of {num_available} not decoded")
    return [picked[i] for i in wanted]


def frame_png_bytes(
    data: bytes, num_frames: int = DEFAULT_NUM_FRAMES, max_pixels: int = MAX_IMAGE_PIXELS
) -> list[bytes]:
    """`sample_frames` as lossless PNGs: what a shard stores per frame (an image like others)."""
    out = []
    for frame in sample_frames(data, num_frames, max_pixels):
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def count_video_placeholders(text: str) -> int:
    return len(VIDEO_PLACEHOLDER_RE.findall(text))


def expand_videos(text: str, num_frames: int, image_placeholder: str = "<|image|>") -> str:
    """`text` with each video placeholder replaced by `num_frames` image placeholders."""
    return VIDEO_PLACEHOLDER_RE.sub(image_placeholder * num_frames, text)


def media_order(texts: Sequence[str]) -> list[str]:
    """ "image" / "video" per placeholder of `texts`, in reading order: which file of a sample's
    images and videos each placeholder takes."""
    pattern = re.compile(f"(?P<video>{VIDEO_PLACEHOLDER_RE.pattern})|{PLACEHOLDER_RE.pattern}")
    return [
        "video" if match.group("video") else "image"
        for text in texts
        for match in pattern.finditer(text)
    ]


# Container -> (encoder, pixel format) `encode_video` writes: FFmpeg's own MPEG-4 Part 2 encoder
# for mp4 and avi (single-threaded it gives the same bytes on every run), VP9 for webm.
VIDEO_CODECS = {
    "mp4": ("mpeg4", "yuv420p"),
    "avi": ("mpeg4", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
}


def encode_video(frames: Sequence[Image.Image], container: str = "mp4", fps: int = 8) -> bytes:
    """Frames (same size, even sides) -> the bytes of a video file (`container`: mp4, avi, webm)."""
    import av
    import numpy as np

    if container not in VIDEO_CODECS:
        raise ValueError(f"container must be one of {sorted(VIDEO_CODECS)}, got {container!r}")
    if not frames:
        raise ValueError("a video needs at least one frame")
    codec, pixel_format = VIDEO_CODECS[container]
    width, height = frames[0].size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        stream.codec_context.thread_count = 1  # deterministic bytes
        for frame in frames:
            array = np.asarray(frame.convert("RGB"))
            output.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        output.mux(stream.encode())  # flush
    return buffer.getvalue()
