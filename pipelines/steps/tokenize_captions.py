"""Step `tokenize_captions`: the filter step's parquet shards -> stage-1 tokenized Arrow shards.

The parquet row groups are cut into chunks of about `rows_per_task` rows; Ray Data runs one task
per chunk that reads its rows (key, url, caption, image) and encodes them with the caption
template (BOS, image run, caption, EOS; loss on caption + EOS), `batch_size` captions per
tokenizer call, labels and truncation vectorized (`owl.data.tokenize.assemble`). The driver
streams the results in input order into `shards/shard-NNNNN.arrow` (`TOKENIZED_SCHEMA`): memory
stays at a few chunks whatever the dataset size, and the output depends only on the input and
config. Reading inside the encoding task (rather than `ray.data.read_parquet` and a separate map)
keeps the images out of a second pass through the object store, and sidesteps Ray Data's
file-listing stage, slower than the whole read (BENCHMARKS.md, "Data").

The chunked read, the streaming writer and the drop accounting are shared with
`tokenize_instructions` (`_tokenized.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from owl.data.manifest import Manifest
from owl.data.tokenize import EncoderSpec, encode_caption_texts, spec_encoder
from pipelines.step import StepContext, StepInput
from pipelines.steps._tokenized import (
    encode_dataset,
    max_length_of,
    results_batch,
    tokenizer_spec,
    write_tokenized,
)

# Ray Data is imported where the step computes: validating a job file or a fully cached `owl run`
# reads `Config` only. owl.data.tokenize imports transformers (and torch) only to load a tokenizer
# in the driver; the Ray workers that run `encode_caption_batch` never import them.

REQUIRED_COLUMNS = ("key", "url", "caption", "image")


@dataclass
class Config:
    # Longest sample in tokens (visual slots included); None: the model's max_positions.
    max_length: int | None = None
    rows_per_shard: int = 10_000
    batch_size: int = 1024  # captions per tokenizer call (and per output block)
    rows_per_task: int = 8192  # rows one Ray task reads and encodes (whole row groups)


def encode_caption_batch(
    batch: pa.Table, *, encoder: EncoderSpec, num_visual_tokens: int, max_length: int
) -> pa.Table:
    """Rows (key, url, caption, image) -> tokenized rows (dropped ones empty, with a reason)."""
    encoded = encode_caption_texts(
        spec_encoder(encoder),
        batch.column("caption").to_pylist(),
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
    )
    images = batch.column("image").combine_chunks().filter(pa.array(encoded.num_images > 0))
    return results_batch(
        encoded,
        batch.column("key").combine_chunks().cast(pa.string()),
        pa.array(["caption"] * batch.num_rows, pa.string()),
        images,
        batch.column("url").combine_chunks().cast(pa.string()),
    )


def _parquet_files(data: StepInput) -> list[Path]:
    files = [data.path(f.path) for f in data.manifest.files if f.path.endswith(".parquet")]
    for path in files:
        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"{path}: unreadable parquet shard ({exc})") from exc
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the filter step writes them")
    return files


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    files = _parquet_files(inputs["data"])
    encoder = tokenizer_spec(inputs)
    max_length = max_length_of(cfg.max_length, ctx)
    num_in = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    if num_in == 0:
        return write_tokenized(None, ctx, cfg.rows_per_shard, 0, Counter())
    ds = encode_dataset(
        files,
        cfg.rows_per_task,
        ctx.resources.cpus_per_worker,
        encode_caption_batch,
        columns=list(REQUIRED_COLUMNS),
        batch_size=cfg.batch_size,
        encoder=encoder,
        num_visual_tokens=ctx.model.num_visual_tokens,
        max_length=max_length,
    )
    return write_tokenized(ds, ctx, cfg.rows_per_shard, num_in, Counter())
