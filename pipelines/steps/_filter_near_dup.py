"""The filter step's near-duplicate rule on Ray Data (`owl.data.near_dup` says what it finds).

One row per (sample, band) -> hash-shuffled by (band, value) into partitions of about
`ROWS_PER_PARTITION` rows -> each partition sorted and its buckets compared on their own. Memory
per worker is one partition (~1M rows of ~40 bytes, whatever the dataset size: the number of
partitions grows with it) plus the largest bucket's comparison chunk; Ray Data's shuffle moves
the rows through the object store (RAY_DATA_ENABLE_DISK_SHUFFLE=1 when they exceed it). 400M
samples at radius 2 are 1.2 billion rows in 1,200 partitions; a bucket holds, for uniformly
spread hashes, N / 2^(64 / (radius + 1)) samples (190 at 400M and radius 2, 50k at radius 4:
the radius sets the comparison cost).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from owl.data.near_dup import band_values, bucket_near_duplicates

# Bucket rows per shuffle partition: a partition is what one map_groups call holds in memory.
ROWS_PER_PARTITION = 1_000_000
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band values over partitions


def _bucket_rows(table: pa.Table, *, radius: int, num_partitions: int) -> pa.Table:
    """(key, phash) rows -> (partition, band, value, key, phash) rows, one per band."""
    hashes = table.column("phash").to_numpy().astype(np.uint64)
    parts = []
    for band, values in enumerate(band_values(hashes, radius)):
        mixed = (values * _MIX + np.uint64(band)) >> np.uint64(32)
        parts.append(
            pa.table(
                {
                    "partition": pa.array((mixed % np.uint64(num_partitions)).astype(np.int64)),
                    "band": pa.array(np.full(len(hashes), band, np.int8)),
                    "value": pa.array(values),
                    "key": table.column("key"),
                    "phash": table.column("phash"),
                }
            )  # fmt: skip
        )
    return pa.concat_tables(parts)


def _partition_drops(rows: pa.Table, *, radius: int) -> pa.Table:
    """One shuffle partition (many buckets) -> the keys in it with a smaller key within the
    radius. Buckets of one sample, most of them, cost a sort and nothing more."""
    rows = rows.sort_by([("band", "ascending"), ("value", "ascending")])
    band = rows.column("band").to_numpy().astype(np.int64)
    value = rows.column("value").to_numpy()
    starts = np.flatnonzero(
        np.concatenate([[True], (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    )
    ends = np.append(starts[1:], len(band))
    keys = rows.column("key").to_pylist()
    hashes = rows.column("phash").to_numpy().astype(np.uint64)
    dropped: set[str] = set()
    for start, end in zip(starts, ends):
        if end - start > 1:
            dropped.update(bucket_near_duplicates(keys[start:end], hashes[start:end], radius))
    return pa.table({"key": pa.array(sorted(dropped), pa.string())})


def near_duplicate_keys(tables: list[pa.Table], radius: int) -> set[str]:
    """Keys of `tables`' (key, phash) rows that have a smaller key within `radius` bits."""
    import ray.data

    tables = [t for t in tables if t.num_rows]
    if not tables:
        return set()
    num_rows = sum(t.num_rows for t in tables) * (radius + 1)
    num_partitions = max(1, -(-num_rows // ROWS_PER_PARTITION))
    ds = (
        ray.data.from_arrow(tables)
        .map_batches(
            _bucket_rows, fn_kwargs={"radius": radius, "num_partitions": num_partitions},
            batch_format="pyarrow",
        )
        .groupby("partition", num_partitions=num_partitions)
        .map_groups(_partition_drops, fn_kwargs={"radius": radius}, batch_format="pyarrow")
    )  # fmt: skip
    dropped: set[str] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        dropped.update(batch.column("key").to_pylist())
    return dropped
