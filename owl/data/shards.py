"""Writing and reading tokenized shards: Arrow IPC *files* with `TOKENIZED_SCHEMA`.

`ShardWriter` appends record batches and rolls over to a new `shard-NNNNN.arrow` every
`rows_per_shard` rows, so its memory is one batch and the file names depend only on the row order.
`close()` returns what a manifest needs per file (path, rows, tokens).

Beside each shard the writer puts its *index*, `shard-NNNNN.index.npy`: an int32 array (3, rows)
of per-sample tokens, images and supervised tokens. The streaming loader plans a shard's samples
(drops, packing) from it without touching the shard's token or image buffers.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from owl.data.schema import TOKENIZED_SCHEMA, check_schema

INDEX_SUFFIX = ".index.npy"
INDEX_FIELDS = ("num_tokens", "num_images", "num_supervised")


def index_path(shard_path: str) -> str:
    """The per-shard index beside a shard: shards/shard-00000.arrow -> shard-00000.index.npy."""
    return shard_path.removesuffix(".arrow") + INDEX_SUFFIX


def shard_index(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """(3, rows) int32: tokens, images and supervised tokens of each sample of a shard."""
    return np.stack(
        [
            np.asarray(table.column("num_tokens"), dtype=np.int32),
            np.asarray(pc.list_value_length(table.column("images")), dtype=np.int32),
            np.asarray(table.column("num_supervised"), dtype=np.int32),
        ]
    )


def write_index(path: str | os.PathLike, index: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(index, dtype=np.int32), allow_pickle=False)


def read_index(path: str | os.PathLike, rows: int) -> np.ndarray:
    index = np.load(str(path), allow_pickle=False)
    if index.shape != (len(INDEX_FIELDS), rows) or index.dtype != np.int32:
        raise ValueError(
            f"{path}: index of shape {index.shape} {index.dtype}, expected (3, {rows}) int32; "
            "re-run the tokenize step"
        )
    return index


@dataclass
class ShardInfo:
    path: str  # relative to the writer's root, '/'-separated
    rows: int
    tokens: int
    supervised: int
    index: str = ""  # its index file, relative like `path`


def _flat(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ints as (flat values, offsets), both int32."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _count_per_row(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Number of True values of `mask` (flat over all rows) in each row."""
    cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return (cumulative[offsets[1:]] - cumulative[offsets[:-1]]).astype(np.int32)


def _strings(values: Sequence[str] | pa.Array) -> pa.Array:
    return (
        values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())
    )


def make_flat_batch(
    sample_ids: Sequence[str] | pa.Array,
    kinds: Sequence[str] | pa.Array,
    input_ids: np.ndarray,
    labels: np.ndarray,
    offsets: np.ndarray,
    images: pa.Array,
    sources: Sequence[str] | pa.Array,
) -> pa.RecordBatch:
    """One record batch in `TOKENIZED_SCHEMA` from flat int32 token ids and labels of all rows
    (row i is `[offsets[i], offsets[i+1])`) and a `list<binary>` images column; counts derived.
    The string columns may be Python strings or Arrow arrays."""
    offsets_array = pa.array(offsets, pa.int32())
    columns = [
        _strings(sample_ids),
        _strings(kinds),
        pa.ListArray.from_arrays(offsets_array, pa.array(input_ids, pa.int32())),
        pa.ListArray.from_arrays(offsets_array, pa.array(labels, pa.int32())),
        images,
        pa.array(np.diff(offsets).astype(np.int32), pa.int32()),
        pa.array(_count_per_row(labels >= 0, offsets), pa.int32()),  # IGNORE_INDEX < 0
        _strings(sources),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=TOKENIZED_SCHEMA)


def make_batch(
    sample_ids: Sequence[str],
    kinds: Sequence[str],
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    images: Sequence[Sequence[bytes]] | pa.Array,
    sources: Sequence[str],
) -> pa.RecordBatch:
    """One record batch of tokenized samples in `TOKENIZED_SCHEMA` (counts are derived).

    `images` is one list of encoded images per row, or already a `list<binary>` array.
    """
    flat_ids, offsets = _flat(input_ids)
    flat_labels, label_offsets = _flat(labels)
    assert np.array_equal(offsets, label_offsets), "input_ids and labels differ in length"
    if not isinstance(images, pa.Array):
        images = pa.array(images, pa.list_(pa.binary()))
    return make_flat_batch(sample_ids, kinds, flat_ids, flat_labels, offsets, images, sources)


def images_column(counts: Sequence[int], values: pa.Array) -> pa.Array:
    """A `list<binary>` column from per-row image counts and the images of all rows in order."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(np.asarray(counts, dtype=np.int32), out=offsets[1:])
    assert offsets[-1] == len(values), "image counts do not add up to the images given"
    return pa.ListArray.from_arrays(pa.array(offsets), values.cast(pa.binary()))


class ShardWriter:
    """Streams record batches into `<root>/<subdir>/shard-NNNNN.arrow`, `rows_per_shard` rows each."""

    def __init__(
        self,
        root: str | os.PathLike,
        rows_per_shard: int,
        subdir: str = "shards",
        schema: pa.Schema = TOKENIZED_SCHEMA,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.root = Path(root)
        self.subdir = subdir
        self.rows_per_shard = rows_per_shard
        self.schema = schema
        (self.root / subdir).mkdir(parents=True, exist_ok=True)
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._current: ShardInfo | None = None
        self._index_parts: list[np.ndarray] = []
        self.shards: list[ShardInfo] = []

    def _open_next(self) -> None:
        rel = f"{self.subdir}/shard-{len(self.shards):05d}.arrow"
        self._writer = pa.ipc.new_file(str(self.root / rel), self.schema)
        self._current = ShardInfo(path=rel, rows=0, tokens=0, supervised=0, index=index_path(rel))
        self._index_parts = []
        self.shards.append(self._current)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            assert self._current is not None
            parts = self._index_parts or [np.zeros((len(INDEX_FIELDS), 0), np.int32)]
            write_index(self.root / self._current.index, np.concatenate(parts, axis=1))
        self._writer = None
        self._current = None
        self._index_parts = []

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if isinstance(batch, pa.Table):
            for part in batch.to_batches():
                self.write(part)
            return
        if batch.schema != self.schema:
            batch = batch.select(self.schema.names).cast(self.schema)
        offset = 0
        while offset < batch.num_rows:
            if self._current is None or self._current.rows >= self.rows_per_shard:
                self._close_current()
                self._open_next()
            assert self._writer is not None and self._current is not None
            take = min(self.rows_per_shard - self._current.rows, batch.num_rows - offset)
            part = batch.slice(offset, take)
            self._writer.write_batch(part)
            self._index_parts.append(shard_index(part))
            self._current.rows += take
            self._current.tokens += int(pc.sum(part.column("num_tokens")).as_py() or 0)
            self._current.supervised += int(pc.sum(part.column("num_supervised")).as_py() or 0)
            offset += take

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_current()


def read_shard(path: str | os.PathLike) -> pa.Table:
    """A whole shard, memory-mapped (no copy), after checking its schema version and columns."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    check_schema(reader.schema, str(path))
    return reader.read_all()


def iter_shard_batches(path: str | os.PathLike) -> Iterator[pa.RecordBatch]:
    """The shard's record batches one by one, memory-mapped."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    check_schema(reader.schema, str(path))
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)
