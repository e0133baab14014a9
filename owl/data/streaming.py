"""The streaming training loader: shards dealt to ranks, a bounded shuffle buffer, lazy per-shard
digests (docs/pipeline.md, "The training data loader").

Per epoch each dataset's shards are permuted (seeded) and laid end to end; rank r of W reads the
row range r of W (`_Share`), in buffers of `shuffle_buffer` samples drawn from every dataset by
weight, each buffer shuffled, its unusable samples dropped and counted, packed into rows and
emitted in order. A shard's digest is checked the first time this rank opens it. Resumes exactly
from (epoch, buffer, row in buffer). The loader settings, the shared collation and the global
loader (`ShardLoader`) are owl.data.loader's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from owl.data.loader import CollatingLoader, LoaderConfig, ShardRef, map_shard, row_values
from owl.data.manifest import sha256_file
from owl.data.packing import Sample, pack_rows, pad_rows


@dataclass(frozen=True)
class Dataset:
    """One source of a stage's data mix: its shards and its weight (share of every buffer)."""

    shards: list[ShardRef]
    weight: float = 1.0
    name: str = ""


class _Share:
    """Rank `rank`'s share of one dataset in one epoch: a seeded permutation of the shards, laid
    end to end, cut into `world_size` row ranges of equal size (+-1 row). A rank's range covers
    whole shards plus at most a part of one shard at each end: it opens only those.
    With `block` > 0 the permuted units are blocks of `block` rows (each shard cut from its
    start; its last block shorter) instead of whole shards: ranks' shares mix rows of more
    shards, so they are alike even when the shards are not (at the cost of opening more shards).
    Pure function of (seed, dataset, epoch, rank, world_size, block) and the shards' row counts;
    `block` = 0 gives the whole-shard dealing exactly."""

    def __init__(
        self, rows: np.ndarray, seed: int, dataset: int, epoch: int, rank: int, world: int,
        block: int = 0,
    ):  # fmt: skip
        if block > 0:
            counts = -(-rows // block)  # blocks per shard
            shard_of = np.repeat(np.arange(len(rows)), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            start_row = (np.arange(len(shard_of)) - first) * block
            sizes = np.minimum(block, rows[shard_of] - start_row)
        else:
            shard_of, start_row, sizes = np.arange(len(rows)), np.zeros(len(rows), np.int64), rows
        perm = np.random.default_rng([seed, dataset, epoch, 0x5A4D]).permutation(len(sizes))
        self.perm, self.unit_row = shard_of[perm], start_row[perm]  # each unit's shard, first row
        self.ends = np.cumsum(sizes[perm])
        self.starts = self.ends - sizes[perm]
        total = int(self.ends[-1])
        self.start, self.stop = rank * total // world, (rank + 1) * total // world

    @property
    def size(self) -> int:
        return self.stop - self.start

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions within this share -> (shard index, row in shard)."""
        glob = positions + self.start
        k = np.searchsorted(self.ends, glob, side="right")
        return self.perm[k], self.unit_row[k] + glob - self.starts[k]


CALIBRATION = 16384  # samples packed at start-up to measure rows per sample


class StreamingLoader(CollatingLoader):
    """Yields collated micro-batches for one rank, forever, touching only this rank's shards.

    Per epoch and dataset, the shards are permuted (seeded) and laid end to end; rank r takes
    rows [r*N/W, (r+1)*N/W) of that sequence, so ranks get the same number of samples (+-1) and
    the shards at the ends of a range are split between two ranks (the balancing of the last
    shards: a row range, not whole shards). The rank's stream is read in *buffers* of
    `shuffle_buffer` samples; with several datasets, each buffer takes a share proportional to
    each dataset's weight (the first dataset's pass defines the epoch; the others cycle through
    their own epochs). A buffer is shuffled (seeded by seed, epoch, buffer), its unusable samples
    are dropped and counted, it is packed (`packing_window` open rows) and its rows are emitted
    in order; micro-batches are consecutive rows.

    Every rank yields exactly `batches_per_epoch()` micro-batches per epoch, computed up front
    from row counts alone: shares' sizes x rows per sample, measured by packing the first buffers
    of (epoch 0, rank 0) (up to `CALIBRATION` samples, from their shards' indexes). A rank with rows left over skips them (counted in
    `loader.epoch_tail_rows`); one that runs short continues into re-shuffled buffers from the
    start of its share (counted in `loader.epoch_fill_rows`).

    Per-sample lengths come from the per-shard index (`owl.data.shards.index_path`) or, when the
    manifest lists none, from the shard's own columns. A shard's sha256 is checked the first time
    this worker opens it, before any of its rows is used. State: (epoch, buffer, row in buffer,
    micro-batches done in the epoch), plus checks, the drop counts and `drawn`: the samples of each
    dataset in the stream's micro-batches so far (exact across a resume).
    """

    def __init__(
        self,
        datasets: list[Dataset] | list[ShardRef],
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
    ) -> None:
        shuffle_buffer = cfg.shuffle_buffer
        if datasets and isinstance(datasets[0], ShardRef):
            datasets = [Dataset(list(datasets))]  # type: ignore[arg-type]
        datasets = [d for d in datasets if d.shards]  # type: ignore[union-attr]
        if not datasets:
            raise ValueError(
                "no tokenized shards to train on: the input manifest lists no .arrow files; "
                "check that the tokenize step produced data"
            )
        if any(d.weight <= 0 for d in datasets):
            raise ValueError(f"dataset weights must be > 0, got {[d.weight for d in datasets]}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if cfg.deal_block_rows < 0:
            raise ValueError(f"deal_block_rows must be >= 0, got {cfg.deal_block_rows}")
        assert 0 <= rank < world_size
        self.cfg, self.rank, self.world_size, self.verify = cfg, rank, world_size, verify
        self.datasets: list[Dataset] = datasets  # type: ignore[assignment]
        self._rows = [np.array([_num_rows(s) for s in d.shards], np.int64) for d in datasets]
        totals = [int(r.sum()) for r in self._rows]
        if min(totals) < world_size:
            raise ValueError(
                f"{min(totals)} samples cannot be shared by {world_size} workers; use more data "
                "or fewer workers"
            )
        weights = np.array([d.weight for d in datasets], float)
        quota = np.maximum(1, np.round(shuffle_buffer * weights / weights.sum())).astype(int)
        self._quota = quota.tolist()  # samples per buffer from each dataset
        # The first dataset defines the epoch: its smallest share (over ranks) in buffers.
        self._share_min = totals[0] // world_size
        self.buffers_per_epoch = -(-self._share_min // self._quota[0])
        self.dropped: Counter = Counter()
        self._shares: dict[tuple[int, int], _Share] = {}
        self._indexes: dict[tuple[int, int], np.ndarray] = {}  # a few buffers' shards
        self._tables: dict[tuple[int, int], pa.Table] = {}  # memory-mapped, a buffer's shards
        self._verified: set[tuple[int, int]] = set()
        self._per_epoch = self._estimate_batches()
        self._check_batches(sum(totals))
        self.epoch = self.buffer = self.row = self.done = 0
        # Samples of each dataset in the micro-batches this stream has yielded or skipped (every
        # micro-batch of a stream is trained by exactly one worker): part of the state.
        self.drawn = [0] * len(datasets)
        self._buffer_key: tuple[int, int] | None = None
        self._counted: tuple[int, int] | None = None
        self._buffer_rows: list[list[tuple[int, int, int]]] = []

    # -- plan ---------------------------------------------------------------------------------

    def _share(self, dataset: int, epoch: int, rank: int | None = None) -> _Share:
        rank = self.rank if rank is None else rank
        key = (dataset, epoch) if rank == self.rank else None
        if key is not None and key in self._shares:
            return self._shares[key]
        share = _Share(
            self._rows[dataset], self.cfg.seed, dataset, epoch, rank, self.world_size,
            self.cfg.deal_block_rows,
        )  # fmt: skip
        if key is not None:
            if len(self._shares) > 2 * len(self.datasets):
                self._shares.clear()  # only the current epochs' shares are needed
            self._shares[key] = share
        return share

    def _buffer_samples(self, epoch: int, buffer: int, rank: int | None = None) -> list[tuple]:
        """(dataset, shard, row) of buffer `buffer` of `epoch`, in stream order (not shuffled).
        Buffers past the end of the first dataset's share wrap around to its start (fill)."""
        out: list[tuple] = []
        taken = self._quota[0]  # samples of the first dataset in this buffer
        for d, quota in enumerate(self._quota):
            if d == 0:
                share = self._share(0, epoch, rank)
                start = buffer * quota
                stop = min(start + quota, share.size) if buffer < self.buffers_per_epoch else None
                positions = np.arange(start, stop if stop is not None else start + quota)
                taken = len(positions)
                positions = positions % share.size
                e_of = np.full(len(positions), epoch)
            else:  # other datasets: an endless stream cycling through their own epochs
                size = self._rows[d].sum() // self.world_size  # the smallest share
                first = (epoch * self.buffers_per_epoch + buffer) * quota
                # The last buffer of an epoch may hold less of the first dataset: the others
                # give as much less, so every buffer keeps the weights' proportions.
                count = quota if taken == self._quota[0] else round(quota * taken / self._quota[0])
                positions_all = np.arange(first, first + count)
                e_of, positions = positions_all // size, positions_all % size
            for e in np.unique(e_of):
                share = self._share(d, int(e), rank)
                shards, rows = share.locate(positions[e_of == e])
                out.extend(zip([d] * len(shards), shards.tolist(), rows.tolist()))
        return out

    def _plan_buffer(self, epoch: int, buffer: int, rank: int | None = None, count: bool = True):
        """The packed rows of one buffer: lists of (dataset, shard, row)."""
        samples = self._buffer_samples(epoch, buffer, rank)
        rng = np.random.default_rng([self.cfg.seed, epoch, buffer, 0xB0F])
        samples = [samples[i] for i in rng.permutation(len(samples))]
        info = np.array([self._index(d, s)[:, r] for d, s, r in samples], np.int64).reshape(-1, 3)
        lengths, images, supervised = info[:, 0], info[:, 1], info[:, 2]
        keep = np.ones(len(samples), dtype=bool)
        for reason, bad in (
            ("too_long", lengths > self.cfg.max_length),
            ("too_many_images", images > self.cfg.max_images_per_row),
            ("no_supervised_tokens", supervised == 0),
        ):
            if count:
                self.dropped[f"loader.{reason}"] += int((bad & keep).sum())
            keep &= ~bad
        order = np.flatnonzero(keep).tolist()
        if not self.cfg.packing:
            rows = pad_rows(order)
        else:
            rows = pack_rows(
                order,
                lengths,
                images,
                max_length=self.cfg.max_length,
                max_images_per_row=self.cfg.max_images_per_row,
                window=self.cfg.packing_window,
            )
        return [[samples[i] for i in row] for row in rows]

    def _estimate_batches(self) -> int:
        """Micro-batches per rank per epoch, the same on every rank, from row counts and the rows
        per sample of the first buffers of (epoch 0, rank 0), up to CALIBRATION samples: their
        shards' indexes only, a few small files."""
        samples = rows = 0
        for buffer in range(self.buffers_per_epoch):
            samples += len(self._buffer_samples(0, buffer, rank=0))
            rows += len(self._plan_buffer(0, buffer, rank=0, count=False))
            if samples >= CALIBRATION:
                break
        per_sample = rows / samples
        samples = self._share_min * sum(self._quota) / self._quota[0]
        return int(samples * per_sample) // self.cfg.micro_batch_size

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Micro-batches this rank (and every rank) gets in every epoch."""
        return self._per_epoch

    @property
    def num_samples(self) -> int:
        """Samples in the datasets (before drops, which are counted as shards are opened)."""
        return int(sum(r.sum() for r in self._rows))

    # -- shards -------------------------------------------------------------------------------

    def _index(self, dataset: int, shard: int) -> np.ndarray:
        """(3, rows) tokens / images / supervised of a shard: its index file, else its columns."""
        key = (dataset, shard)
        index = self._indexes.get(key)
        if index is None:
            from owl.data.shards import read_index, shard_index

            ref = self.datasets[dataset].shards[shard]
            if ref.index:
                if self.verify:
                    _verify_one(ref.index, ref.index_sha256)
                index = read_index(ref.index, _num_rows(ref))
            else:
                index = shard_index(self._table(dataset, shard))
            _cache_put(self._indexes, key, index, 256)
        return index

    def _table(self, dataset: int, shard: int) -> pa.Table:
        key = (dataset, shard)
        table = self._tables.get(key)
        if table is None:
            ref = self.datasets[dataset].shards[shard]
            if self.verify and key not in self._verified:
                _verify_one(ref.path, ref.sha256)  # lazily: the first time this worker reads it
                self._verified.add(key)
            table = map_shard(ref.path)
            _cache_put(self._tables, key, table, 32)
        return table

    def sample(self, ref: tuple[int, int, int]) -> Sample:
        dataset, shard, row = ref
        table = self._table(dataset, shard)
        return Sample(
            input_ids=row_values(table["input_ids"], row),
            labels=row_values(table["labels"], row),
            images=table["images"][row].as_py(),
        )

    # -- iteration ----------------------------------------------------------------------------

    def _rows_of(self, epoch: int, buffer: int) -> list[list[tuple[int, int, int]]]:
        if self._buffer_key != (epoch, buffer):
            counted = (epoch, buffer) == self._counted  # its drops are in the restored counts
            self._buffer_rows = self._plan_buffer(epoch, buffer, count=not counted)
            self._buffer_key = (epoch, buffer)
        return self._buffer_rows

    def _next_rows(self) -> list[list[tuple[int, int, int]]]:
        """The next micro-batch's rows; advances (epoch, buffer, row, done)."""
        out: list[list[tuple[int, int, int]]] = []
        while len(out) < self.cfg.micro_batch_size:
            rows = self._rows_of(self.epoch, self.buffer)
            take = rows[self.row : self.row + self.cfg.micro_batch_size - len(out)]
            if self.buffer >= self.buffers_per_epoch:
                self.dropped["loader.epoch_fill_rows"] += len(take)
            out.extend(take)
            self.row += len(take)
            if self.row >= len(rows):
                self.buffer, self.row = self.buffer + 1, 0
        for row in out:
            for dataset, _, _ in row:
                self.drawn[dataset] += 1
        self.done += 1
        if self.done == self._per_epoch:  # epoch end: skip what is left of this rank's share
            tail = len(self._rows_of(self.epoch, self.buffer)) - self.row
            if self.buffer < self.buffers_per_epoch:
                tail += sum(
                    len(self._plan_buffer(self.epoch, b, count=False))
                    for b in range(self.buffer + 1, self.buffers_per_epoch)
                )
                self.dropped["loader.epoch_tail_rows"] += tail
            self.epoch, self.buffer, self.row, self.done = self.epoch + 1, 0, 0, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "buffer": self.buffer,
            "row": self.row,
            "done": self.done,
            **self._run_state(),
            "dropped": dict(self.dropped),  # counts so far (not needed to resume)
            "drawn": list(self.drawn),  # samples per dataset so far, in `datasets` order
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_run_state(state)
        if "buffer" not in state:
            raise ValueError(
                "loader state was saved by the other loader (the stage's data.loader differs)"
            )
        self.epoch, self.buffer = int(state["epoch"]), int(state["buffer"])
        self.row, self.done = int(state["row"]), int(state["done"])
        self.dropped = Counter(state.get("dropped", {}))
        self.drawn = list(state.get("drawn", [0] * len(self.datasets)))
        self._buffer_key = None  # replanned on the next batch
        self._counted = (self.epoch, self.buffer) if self.row else None


def _cache_put(cache: dict, key: Any, value: Any, limit: int) -> None:
    """Insert, dropping the oldest entries beyond `limit` (insertion order)."""
    cache[key] = value
    while len(cache) > limit:
        cache.pop(next(iter(cache)))


def _num_rows(ref: ShardRef) -> int:
    """Rows of a shard: the manifest's count, else the record batches' lengths (footer only)."""
    if ref.rows >= 0:
        return ref.rows
    if not Path(ref.path).exists():
        raise ValueError(f"shard {ref.path} is listed in the manifest but missing on disk")
    reader = pa.ipc.open_file(pa.memory_map(ref.path, "r"))
    return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _verify_one(path: str, sha256: str) -> None:
    if not Path(path).exists():
        raise ValueError(f"shard {path} is listed in the manifest but missing on disk")
    if sha256_file(path) != sha256:
        raise ValueError(
            f"shard {path}: sha256 does not match its manifest; the file changed after the "
            "tokenize step wrote it (it was not trained on), re-run that step"
        )
