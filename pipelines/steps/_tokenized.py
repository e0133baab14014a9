"""What both tokenize steps share (not a step): the chunked parquet read run as Ray Data tasks
(`parquet_chunks` / `encode_chunks` / `encode_dataset`), the encoded rows' table
(`results_batch`), and the driver's streaming writer with its drop accounting
(`write_tokenized`). See `tokenize_captions` for the design.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from owl.data.manifest import Manifest
from owl.data.schema import TOKENIZED_SCHEMA
from owl.data.shards import ShardWriter, images_column, make_flat_batch
from owl.data.tokenize import EncodedBatch, EncoderSpec
from owl.data.tokenizer import load_tokenizer
from pipelines.step import StepContext, StepInput

if TYPE_CHECKING:
    import ray.data

TOKENIZER_DIR = "tokenizer"
DROP_COLUMN = "drop_reason"  # "" for a kept row
TRUNCATED_COLUMN = "truncated"


def results_batch(
    encoded: EncodedBatch,
    sample_ids: list[str] | pa.Array,
    kinds: list[str] | pa.Array,
    images: pa.Array,
    sources: list[str] | pa.Array,
) -> pa.Table:
    """Tokenized rows (dropped ones empty, with their reason) as a table the driver writes from.

    `images` holds the kept images of all rows in order (`encoded.num_images` per row)."""
    batch = make_flat_batch(
        sample_ids,
        kinds,
        encoded.input_ids,
        encoded.labels,
        encoded.offsets,
        images_column(encoded.num_images, images),
        sources,
    )
    table = pa.Table.from_batches([batch])
    table = table.append_column(DROP_COLUMN, pa.array(encoded.reasons(), pa.string()))
    return table.append_column(TRUNCATED_COLUMN, pa.array(encoded.truncated, pa.bool_()))


def parquet_chunks(files: Sequence[Path], rows_per_task: int) -> list[dict[str, Any]]:
    """The files' row groups in order, cut into chunks of about `rows_per_task` rows or fewer,
    of similar sizes within a file (whole row groups; empty ones skipped): one Ray task each."""
    chunks: list[dict[str, Any]] = []
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        num_chunks = -(-sum(sizes) // rows_per_task)
        groups: dict[int, list[int]] = {}
        start = 0
        for group, size in enumerate(sizes):
            if size:  # chunk k takes the groups that start in its share of the file's rows
                groups.setdefault(start * num_chunks // sum(sizes), []).append(group)
            start += size
        chunks += [{"path": str(path), "row_groups": g} for _, g in sorted(groups.items())]
    return chunks


def encode_chunks(
    chunks: pa.Table,
    *,
    encode: Callable[..., pa.Table],
    columns: list[str],
    batch_size: int,
    **kwargs: Any,
) -> Iterator[pa.Table]:
    """Ray Data map_batches function over `parquet_chunks` rows: stream each chunk's `columns`
    `batch_size` rows at a time through `encode(rows, **kwargs)`, yielding the results in order
    (a task holds one batch, not its whole chunk)."""
    for path, groups in zip(chunks["path"].to_pylist(), chunks["row_groups"].to_pylist()):
        batches = pq.ParquetFile(path).iter_batches(batch_size, row_groups=groups, columns=columns)
        for batch in batches:
            yield encode(pa.Table.from_batches([batch]), **kwargs)


def encode_dataset(
    files: Sequence[Path],
    rows_per_task: int,
    num_cpus: float,
    encode: Callable[..., pa.Table],
    **fn_kwargs: Any,
) -> ray.data.Dataset:
    """The Ray Data pipeline of both tokenize steps: one task per chunk of the parquet `files`."""
    import ray.data

    chunks = parquet_chunks(files, rows_per_task)
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    # Tasks, not an actor pool: actors would hold CPUs other steps' tasks need (a deadlock on a
    # small cluster); the encoder is cached per worker process instead.
    return ds.map_batches(
        encode_chunks,
        fn_kwargs=dict(encode=encode, **fn_kwargs),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
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
        # The loader's plan of the shard: no rows of its own (they are the shard's, counted once).
        manifest.add_file(ctx.out_dir, shard.index)
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


def tokenizer_spec(inputs: dict[str, StepInput]) -> EncoderSpec:
    """The input tokenizer as the workers need it (fails before any work if it is unusable)."""
    return EncoderSpec.of(load_tokenizer(inputs["tokenizer"].path(TOKENIZER_DIR)))


def max_length_of(cfg_max_length: int | None, ctx: StepContext) -> int:
    max_length = cfg_max_length or ctx.model.decoder.max_positions
    if max_length <= ctx.model.num_visual_tokens:
        raise ValueError(
            f"max_length {max_length} leaves no room for text after one image of "
            f"{ctx.model.num_visual_tokens} visual tokens; raise max_length"
        )
    return max_length
