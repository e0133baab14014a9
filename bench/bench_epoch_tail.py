"""Benchmark: rows the streaming loader skips (or re-reads) at epoch ends, by how it deals rows.

Every rank yields the same number of micro-batches per epoch (ZeRO needs it), computed once from
rank 0's first buffers; a rank whose share packs into more rows skips the rest
(`loader.epoch_tail_rows`), one with fewer re-reads rows (`loader.epoch_fill_rows`). With few
shards per rank and unalike shards (the demo's stage 2: two shards, the second holding every
text-only sample) the ranks' shares differ, and so do their row counts.

This plans the loader only (the per-shard indexes: lengths, images, supervised tokens; no shard
is read) for each rank and epoch, and counts per epoch: the rows each rank's share packs into,
the micro-batch count, and the rows skipped and re-read, for whole-shard dealing (the default)
and for `LoaderConfig.deal_block_rows` blocks, over several seeds.

    .venv/bin/python bench/bench_epoch_tail.py                      # synthetic demo-like shards
    .venv/bin/python bench/bench_epoch_tail.py --indexes DIR/shards  # a tokenize step's indexes

The synthetic shards follow the demo's stage-2 data (tokenize_instructions of jobs/demo.yaml):
shard 0 holds 10,000 one-image conversations of 45-180 tokens, shard 1 6,000 more and the 2,000
text-only tasks of 26-36 tokens; micro-batches of 6 rows of 256 tokens, 2 ranks (the demo's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from owl.data.loader import LoaderConfig, ShardRef  # noqa: E402
from owl.data.streaming import StreamingLoader  # noqa: E402


def synthetic_indexes(folder: Path, seed: int = 0) -> list[Path]:
    """Two shards shaped like the demo's stage-2 data (see the module docstring)."""
    rng = np.random.default_rng(seed)

    def conversations(n: int) -> np.ndarray:
        tokens = np.clip(rng.normal(97, 32, n), 45, 180).astype(np.int32)
        return np.stack([tokens, np.ones(n, np.int32), rng.integers(5, 15, n, dtype=np.int32)])

    text = np.stack([rng.integers(26, 37, 2000, dtype=np.int32), np.zeros(2000, np.int32),
                     np.full(2000, 2, np.int32)])  # fmt: skip
    paths = []
    for i, index in enumerate((conversations(10_000), np.hstack([conversations(6_000), text]))):
        paths.append(folder / f"shard-{i:05d}.index.npy")
        np.save(paths[-1], index)
    return paths


def count(refs: list[ShardRef], cfg: LoaderConfig, world: int, epochs: int) -> dict[str, float]:
    """Rows used / skipped / re-read per epoch, summed over ranks and epochs."""
    loaders = [StreamingLoader(refs, cfg, rank=r, world_size=world, verify=False)
               for r in range(world)]  # fmt: skip
    used = loaders[0].batches_per_epoch() * cfg.micro_batch_size
    skipped = filled = 0
    rows_per_rank = []
    for epoch in range(epochs):
        for ld in loaders:
            rows = sum(len(ld._plan_buffer(epoch, b, count=False))
                       for b in range(ld.buffers_per_epoch))  # fmt: skip
            rows_per_rank.append(rows)
            skipped += max(0, rows - used)
            filled += max(0, used - rows)
    return {
        "batches_per_epoch": loaders[0].batches_per_epoch(),
        "rows_used": used * world * epochs,
        "skipped": skipped,
        "filled": filled,
        "rank_rows_min": min(rows_per_rank),
        "rank_rows_max": max(rows_per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--indexes", type=Path, help="folder of shard-NNNNN.index.npy files")
    parser.add_argument("--blocks", default="0,2000,1000,500,250", help="deal_block_rows values")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = (sorted(args.indexes.glob("*.index.npy")) if args.indexes
                 else synthetic_indexes(Path(tmp)))  # fmt: skip
        refs = [ShardRef(path=str(p).replace(".index.npy", ".arrow"), sha256="",
                         rows=np.load(p).shape[1], index=str(p)) for p in paths]  # fmt: skip
        print(f"{len(refs)} shards, {sum(r.rows for r in refs):,} samples; "
              f"{args.world_size} ranks, micro-batch {args.micro_batch_size} x {args.max_length}, "
              f"{args.epochs} epochs, seeds 0-{args.seeds - 1}")  # fmt: skip
        print("deal_block_rows  skipped %  re-read %  (per seed: skipped+re-read % of rows used)"
              "  rank rows min-max")  # fmt: skip
        for block in (int(b) for b in args.blocks.split(",")):
            started = time.perf_counter()
            results = [
                count(refs, LoaderConfig(args.micro_batch_size, args.max_length, seed=seed,
                                         deal_block_rows=block), args.world_size, args.epochs)
                for seed in range(args.seeds)
            ]  # fmt: skip
            used = sum(r["rows_used"] for r in results)
            per_seed = " ".join(f"{100 * (r['skipped'] + r['filled']) / r['rows_used']:.1f}"
                                for r in results)  # fmt: skip
            print(f"{block:>15}  {100 * sum(r['skipped'] for r in results) / used:9.2f}"
                  f"  {100 * sum(r['filled'] for r in results) / used:8.2f}  ({per_seed})"
                  f"  {min(r['rank_rows_min'] for r in results)}-"
                  f"{max(r['rank_rows_max'] for r in results)}"
                  f"  [{time.perf_counter() - started:.1f} s]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
