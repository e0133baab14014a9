"""Step `tokenize_captions`: the filter step's parquet shards -> stage-1 tokenized Arrow shards.

Ray Data reads the parquet rows (key, url, caption, image), Ray tasks encode them with the
caption template (BOS, image run, caption, EOS; loss on caption + EOS), and the driver streams the
results in input order into `shards/shard-NNNNN.arrow` (`TOKENIZED_SCHEMA`): memory stays at a
few blocks whatever the dataset size, and the output depends only on the input and config.

`write_tokenized` (the streaming writer and drop accounting) is shared with `tokenize_instructions`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from transformers import PreTrainedTokenizerFast

from owl.data.manifest import Manifest
from owl.data.schema import TOKENIZED_SCHEMA
from owl.data.shards import ShardWriter, images_column, make_batch
from owl.data.templates import DropSample
from owl.data.tokenize import Encoded, encode_captions, load_tokenizer
from pipelines.step import StepContext, StepInput

REQUIRED_COLUMNS = ("key", "url", "caption", "image")
TOKENIZER_DIR = "tokenizer"
DROP_COLUMN = "drop_reason"  # "" for a kept row
TRUNCATED_COLUMN = "truncated"


@dataclass
class Config:
    # Longest sample in tokens (visual slots included); None: the model's max_positions.
    max_length: int | None = None
    rows_per_shard: int = 10_000
    batch_size: int = 512


def results_batch(
    results: Sequence[Encoded | DropSample],
    sample_ids: list[str],
    kind: str,
    image_counts_and_values: tuple[list[int], pa.Array],
    sources: list[str],
) -> pa.Table:
    """Tokenized rows (dropped ones empty, with their reason) as a table the driver writes from."""
    kept = [r if isinstance(r, Encoded) else None for r in results]
    batch = make_batch(
        sample_ids,
        [kind] * len(results),
        [r.input_ids if r else [] for r in kept],
        [r.labels if r else [] for r in kept],
        images_column(*image_counts_and_values),
        sources,
    )
    table = pa.Table.from_batches([batch])
    reasons = [r.reason if isinstance(r, DropSample) else "" for r in results]
    truncated = [bool(r and r.truncated) for r in kept]
    table = table.append_column(DROP_COLUMN, pa.array(reasons, pa.string()))
    return table.append_column(TRUNCATED_COLUMN, pa.array(truncated, pa.bool_()))


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Loaded once per Ray worker process, reused by every batch it encodes."""
    return load_tokenizer(path)


def encode_caption_batch(
    batch: pa.Table, *, tokenizer_dir: str, num_visual_tokens: int, max_length: int
) -> pa.Table:
    """Ray Data map_batches function: rows (key, url, caption, image) -> tokenized rows."""
    results = encode_captions(
        cached_tokenizer(tokenizer_dir),
        [c or "" for c in batch.column("caption").to_pylist()],
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
    )
    counts = [r.num_images if isinstance(r, Encoded) else 0 for r in results]
    images = batch.column("image").combine_chunks().filter(pa.array([c > 0 for c in counts]))
    return results_batch(
        results,
        [str(k) for k in batch.column("key").to_pylist()],
        "caption",
        (counts, images),
        [str(u) for u in batch.column("url").to_pylist()],
    )


def write_tokenized(
    ds: ray.data.Dataset | None,
    ctx: StepContext,
    rows_per_shard: int,
    num_in: int,
    predropped: Counter,
) -> Manifest:
    """Stream the encoded dataset (None: nothing to encode) into shards in input order; count
    drops (plus those found before encoding, `predropped`); list the shards."""
    tables: Iterable[pa.Table] = []
    if ds is not None:
        ds.context.execution_options.preserve_order = True  # deterministic shard contents
        tables = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    dropped = Counter(predropped)
    num_truncated = 0
    with ShardWriter(ctx.out_dir, rows_per_shard) as writer:
        for table in tables:
            reasons = table.column(DROP_COLUMN)
            for item in pc.value_counts(reasons).to_pylist():
                if item["values"]:
                    dropped[item["values"]] += item["counts"]
            kept = table.filter(pc.equal(reasons, ""))
            num_truncated += int(pc.sum(kept.column(TRUNCATED_COLUMN)).as_py() or 0)
            writer.write(kept.select(TOKENIZED_SCHEMA.names))
            ctx.progress(sum(s.rows for s in writer.shards), num_in, "samples tokenized")
        shards = writer.close()
    manifest = Manifest(step=ctx.step)
    for shard in shards:
        manifest.add_file(ctx.out_dir, shard.path, rows=shard.rows, tokens=shard.tokens)
    manifest.dropped = {f"{ctx.step}.{reason}": n for reason, n in sorted(dropped.items())}
    manifest.stats.update(
        samples_in=num_in,
        samples_out=sum(s.rows for s in shards),
        tokens=sum(s.tokens for s in shards),
        supervised_tokens=sum(s.supervised for s in shards),
        truncated=num_truncated,
        shards=len(shards),
    )
    return manifest


def tokenizer_dir(inputs: dict[str, StepInput]) -> str:
    path = inputs["tokenizer"].path(TOKENIZER_DIR)
    load_tokenizer(path)  # fail before any work if the folder is unusable
    return str(path)


def max_length_of(cfg_max_length: int | None, ctx: StepContext) -> int:
    max_length = cfg_max_length or ctx.model.decoder.max_positions
    if max_length <= ctx.model.num_visual_tokens:
        raise ValueError(
            f"max_length {max_length} leaves no room for text after one image of "
            f"{ctx.model.num_visual_tokens} visual tokens; raise max_length"
        )
    return max_length


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
    tok_dir = tokenizer_dir(inputs)
    max_length = max_length_of(cfg.max_length, ctx)
    num_in = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    if num_in == 0:
        return write_tokenized(None, ctx, cfg.rows_per_shard, 0, Counter())
    ds = ray.data.read_parquet([str(p) for p in files]).select_columns(list(REQUIRED_COLUMNS))
    # Tasks, not an actor pool: actors would hold CPUs the read tasks need (a deadlock on a
    # small cluster); the tokenizer is cached per worker process instead.
    ds = ds.map_batches(
        encode_caption_batch,
        fn_kwargs=dict(
            tokenizer_dir=tok_dir,
            num_visual_tokens=ctx.model.num_visual_tokens,
            max_length=max_length,
        ),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=ctx.resources.cpus_per_worker,
    )
    return write_tokenized(ds, ctx, cfg.rows_per_shard, num_in, Counter())
