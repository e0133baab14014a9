"""Step `tokenize_instructions`: instruction files (LLaVA / mPLUG-Owl2 JSON, Alpaca, ShareGPT) ->
stage-2 tokenized Arrow shards with the model variant's conversation template.

The driver streams the sources (text only; unusable records are counted by reason) into parquet
work files of `rows_per_task` records, Ray Data tasks (one per file) read each sample's image
files and encode it (a missing image is counted, not fatal), and the driver streams the results
in source order into `shards/shard-NNNNN.arrow`. Nothing holds the whole source in memory: a
665k-sample LLaVA file is parsed incrementally and only one work file's rows are buffered.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from owl.data import uri
from owl.data.image import ImageProblem, checked_image_bytes
from owl.data.manifest import Manifest
from owl.data.sources import Bad, Record, SourceSpec, check_source, read_source
from owl.data.templates import DropSample, Turn
from owl.data.tokenize import (
    EncoderSpec,
    conversation_batch_pieces,
    encode_piece_lists,
    spec_encoder,
)
from owl.data.video import (
    DEFAULT_NUM_FRAMES,
    count_video_placeholders,
    expand_videos,
    frame_png_bytes,
    media_order,
)
from pipelines.step import StepContext, StepInput, resolve_path
from pipelines.steps._tokenized import (
    encode_dataset,
    max_length_of,
    results_batch,
    tokenizer_spec,
    write_tokenized,
)

# Ray Data is imported where the step computes; transformers never in the workers (see
# tokenize_captions).


@dataclass
class Config:
    # Instruction files: {format: llava|alpaca|sharegpt, path, image_folder}; paths may be `@shapes/...`.
    sources: list[SourceSpec] = field(default_factory=list)
    # Longest sample in tokens (visual slots included); None: the model's max_positions.
    max_length: int | None = None
    # Replaces the variant's default system prompt ("" removes it); None keeps the default.
    system: str | None = None
    rows_per_shard: int = 10_000
    batch_size: int = 128  # samples per tokenizer call (their images are read together)
    rows_per_task: int = 2048  # samples one Ray task encodes
    # Frames sampled uniformly from each video, each an image slot (owl.data.video).
    num_frames: int = DEFAULT_NUM_FRAMES

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")


def _read_image(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if "://" not in path:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    return uri.read_bytes(path)  # s3://, gs://, ... (owl.data.uri)


def _read_media(media: list[tuple[str, str]], num_frames: int) -> list[bytes] | DropSample:
    """The image bytes of a sample's media in slot order: an image's (normalised when it needs
    it, `checked_image_bytes`), a video's `num_frames` sampled frames (PNG); or why not."""
    found: list[bytes] = []
    for kind, path in media:
        data = _read_image(path)
        if data is None:
            return DropSample(f"missing_{kind}", path)
        try:  # decoded once here: training never meets an image it cannot decode
            if kind == "video":
                found.extend(frame_png_bytes(data, num_frames))
            else:
                found.append(checked_image_bytes(data))
        except ImageProblem as exc:  # VideoProblem included
            return DropSample(exc.reason, f"{path}: {exc}")
    return found


def _with_videos(
    turns: list[Turn], images: list[str], videos: list[str], num_frames: int
) -> tuple[list[Turn], list[tuple[str, str]]] | DropSample:
    """Turns with each video placeholder expanded to `num_frames` image placeholders, and the
    sample's (kind, path) per placeholder in reading order; or why the videos do not fit."""
    placed = sum(count_video_placeholders(t.text) for t in turns)
    if placed != len(videos):
        return DropSample(
            "placeholder_video_mismatch", f"{placed} placeholders, {len(videos)} videos"
        )
    order = media_order([t.text for t in turns])
    if order.count("image") != len(images):
        return DropSample(
            "placeholder_image_mismatch",
            f"{order.count('image')} placeholders, {len(images)} images",
        )
    files = {"image": iter(images), "video": iter(videos)}
    media = [(kind, next(files[kind])) for kind in order]
    return [Turn(t.role, expand_videos(t.text, num_frames)) for t in turns], media


def encode_conversation_batch(
    batch: pa.Table,
    *,
    encoder: EncoderSpec,
    variant: str,
    num_visual_tokens: int,
    max_length: int,
    system: str | None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> pa.Table:
    """Rows (sample_id, turns, images, source[, videos]) -> tokenized rows: reads the images and
    videos, encodes.

    A sample the template rejects is counted under that reason; one whose template is fine but an
    image (video) file is missing under "missing_image" ("missing_video"), one whose image does
    not decode under the `owl.data.image` reason (not_an_image, truncated_image, empty_file,
    decompression_bomb), a video under the `owl.data.video` one; its files are not read further.
    Images that need it are normalised (16-bit, alpha, CMYK, EXIF orientation) and stored as PNG
    (`checked_image_bytes`); a video becomes `num_frames` frames, each an image slot."""
    image_paths = [json.loads(paths) for paths in batch.column("images").to_pylist()]
    video_paths = [[] for _ in image_paths]
    if "videos" in batch.column_names:
        video_paths = [json.loads(paths) for paths in batch.column("videos").to_pylist()]
    samples: list[tuple[list[Turn], int]] = []
    media: list[list[tuple[str, str]] | DropSample] = []
    for turns_json, images, videos in zip(
        batch.column("turns").to_pylist(), image_paths, video_paths
    ):
        turns = [Turn(role, text) for role, text in json.loads(turns_json)]
        if not videos:  # the image-only path, exactly as before videos existed
            samples.append((turns, len(images)))
            media.append([("image", path) for path in images])
            continue
        expanded = _with_videos(turns, images, videos, num_frames)
        if isinstance(expanded, DropSample):
            samples.append((turns, len(images)))
            media.append(expanded)
            continue
        samples.append((expanded[0], len(images) + num_frames * len(videos)))
        media.append(expanded[1])
    pieces = conversation_batch_pieces(samples, variant, system)
    slots: list[int] = []  # image slots per row
    images: list[bytes] = []  # of the samples still kept, in order
    for row, sample_media in enumerate(media):
        slots.append(samples[row][1])
        if isinstance(sample_media, DropSample) and not isinstance(pieces[row], DropSample):
            pieces[row] = sample_media
        if isinstance(pieces[row], DropSample):
            continue
        assert not isinstance(sample_media, DropSample)
        found = _read_media(sample_media, num_frames)
        if isinstance(found, DropSample):
            pieces[row] = found
        else:
            images.extend(found)
    encoded = encode_piece_lists(
        spec_encoder(encoder), pieces, num_visual_tokens=num_visual_tokens, max_length=max_length
    )
    # Truncation may have removed trailing images, and a sample may have been dropped after all.
    keep_images = [
        i < encoded.num_images[row]
        for row, num_slots in enumerate(slots)
        if not isinstance(pieces[row], DropSample)
        for i in range(num_slots)
    ]
    return results_batch(
        encoded,
        batch.column("sample_id").to_pylist(),
        ["multimodal" if num_slots else "text" for num_slots in slots],
        pa.array(images, pa.binary()).filter(pa.array(keep_images, pa.bool_())),
        batch.column("source").to_pylist(),
    )


WORK_DIR = "_work"
RECORD_COLUMNS = ("sample_id", "turns", "images", "source", "videos")  # turns, media: JSON


def _write_records(
    specs: list[SourceSpec], work: Path, rows_per_file: int, row_group_size: int, dropped: Counter
) -> tuple[list[Path], int]:
    """Stream every usable sample of every source, as a small text-only row, into parquet files
    of `rows_per_file` rows under `work`; Bad ones counted. (files, number of rows written)"""
    schema = pa.schema([(name, pa.string()) for name in RECORD_COLUMNS])
    files: list[Path] = []
    columns: dict[str, list[str]] = {name: [] for name in RECORD_COLUMNS}
    num_rows = 0

    def flush() -> None:
        files.append(work / f"records-{len(files):05d}.parquet")
        pq.write_table(pa.table(columns, schema=schema), files[-1], row_group_size=row_group_size)
        for values in columns.values():
            values.clear()

    for spec in specs:
        for record in read_source(spec):
            if isinstance(record, Bad):
                dropped[record.reason] += 1
                continue
            assert isinstance(record, Record)
            columns["sample_id"].append(record.sample_id)
            columns["turns"].append(json.dumps([[t.role, t.text] for t in record.turns]))
            columns["images"].append(json.dumps(record.images))
            columns["source"].append(record.source)
            columns["videos"].append(json.dumps(record.videos))
            num_rows += 1
            if len(columns["sample_id"]) == rows_per_file:
                flush()
    if columns["sample_id"]:
        flush()
    return files, num_rows


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    if not cfg.sources:
        raise ValueError("tokenize_instructions.sources: empty; list at least one instruction file")
    specs = [
        SourceSpec(
            s.format,
            resolve_path(s.path, inputs),
            resolve_path(s.image_folder, inputs) if s.image_folder else None,
        )
        for s in cfg.sources
    ]
    for spec in specs:
        check_source(spec)
    encoder = tokenizer_spec(inputs)
    max_length = max_length_of(cfg.max_length, ctx)
    work = ctx.out_dir / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dropped: Counter = Counter()
    files, num_rows = _write_records(specs, work, cfg.rows_per_task, cfg.batch_size, dropped)
    num_in = num_rows + sum(dropped.values())
    ds = None
    if num_rows:
        ds = encode_dataset(
            files,
            cfg.rows_per_task,
            ctx.resources.cpus_per_worker,
            encode_conversation_batch,
            columns=list(RECORD_COLUMNS),
            batch_size=cfg.batch_size,
            encoder=encoder,
            variant=ctx.model.variant,
            num_visual_tokens=ctx.model.num_visual_tokens,
            max_length=max_length,
            system=cfg.system,
            num_frames=cfg.num_frames,
        )
    manifest = write_tokenized(ds, ctx, cfg.rows_per_shard, num_in, dropped)
    shutil.rmtree(work)
    return manifest
