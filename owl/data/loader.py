"""The resumable training loaders' common parts and the global loader (`ShardLoader`).

Common to both loaders: shard references from a manifest (`ShardRef`), their verification, the
loader settings (`LoaderConfig`) and the collation of rows into micro-batches with their images
(`CollatingLoader`). The streaming loader, the default in training, is owl.data.streaming.

The global loader's stages, in order: verify shards against the manifest -> index sample lengths -> drop (and count)
samples that cannot be trained on -> per-epoch seeded shuffle -> pack into rows (or one sample
per row) -> group rows into micro-batches -> deal micro-batches to ranks -> collate + images.

The whole plan of an epoch is a pure function of (seed, epoch), so every rank computes the same
plan without talking to the others, each takes a disjoint share (micro-batch j goes to rank
j % world_size), all ranks get the same number of micro-batches, and `(epoch, offset)` is enough
to continue with the exact next micro-batch after a restart.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from owl import IGNORE_INDEX
from owl.data.manifest import Manifest, sha256_file
from owl.data.packing import Sample, collate, pack_rows, pad_rows
from owl.data.schema import check_schema


@dataclass(frozen=True)
class ShardRef:
    path: str
    sha256: str
    rows: int = -1  # from the manifest; -1 = unknown (read from the file's footer when needed)
    index: str = ""  # the per-shard index beside it (owl.data.shards.index_path); "" = none
    index_sha256: str = ""


def shards_from_manifest(manifest: Manifest, directory: str | Path) -> list[ShardRef]:
    """The tokenized `.arrow` shards a manifest lists, as absolute paths with their digests, row
    counts and per-shard indexes (when the manifest lists them)."""
    from owl.data.shards import index_path

    entries = {e.path: e for e in manifest.files}
    root = os.fspath(directory)  # plain string joins: tens of thousands of shards at scale
    shards = []
    for e in sorted(manifest.files, key=lambda e: e.path):
        if not e.path.endswith(".arrow"):
            continue
        index = entries.get(index_path(e.path))
        shards.append(
            ShardRef(
                path=os.path.join(root, e.path),
                sha256=e.sha256,
                rows=e.rows if e.rows is not None else -1,
                index=os.path.join(root, index.path) if index else "",
                index_sha256=index.sha256 if index else "",
            )
        )
    return shards


def verify_shards(shards: list[ShardRef]) -> None:
    """Raise ValueError naming the first shard that is missing or whose sha256 is not the listed one."""
    if not shards:
        raise ValueError(
            "no tokenized shards to train on: the input manifest lists no .arrow files; "
            "check that the tokenize step produced data"
        )
    for shard in shards:
        if not Path(shard.path).exists():
            raise ValueError(f"shard {shard.path} is listed in the manifest but missing on disk")
        if sha256_file(shard.path) != shard.sha256:
            raise ValueError(
                f"shard {shard.path}: sha256 does not match its manifest; the file changed after "
                "the tokenize step wrote it, re-run that step"
            )


@dataclass(frozen=True)
class LoaderConfig:
    micro_batch_size: int
    max_length: int
    max_images_per_row: int = 8
    packing: bool = True
    packing_window: int = 16
    seed: int = 0
    pad_id: int = 0
    image_size: int = 224
    image_mode: str = "pad"
    shuffle_buffer: int = 16384  # StreamingLoader: samples shuffled and packed together
    # StreamingLoader: deal blocks of this many rows to ranks instead of whole shards (0: whole
    # shards, the default). Makes ranks' shares alike when the shards are not (fewer rows skipped
    # or re-read at epoch ends; bench/bench_epoch_tail.py), each rank opening more shards.
    deal_block_rows: int = 0


class CollatingLoader:
    """What both loaders share: rows of sample references -> one collated micro-batch, and the
    checks that a saved state belongs to this run."""

    cfg: LoaderConfig
    rank: int
    world_size: int

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def _run_state(self) -> dict[str, int]:
        """What a saved state must match to resume here: data, seed and workers."""
        return {key: getattr(self, key) for key in ("seed", "rank", "world_size", "num_samples")}

    def _check_run_state(self, state: dict[str, Any]) -> None:
        for key, value in self._run_state().items():
            if state[key] != value:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has "
                    f"{key}={value}; resume with the same data, seed and workers"
                )

    def _check_batches(self, num_samples: int) -> None:
        if self.batches_per_epoch(0) == 0:
            raise ValueError(
                f"{num_samples} samples make fewer micro-batches than one per worker "
                f"(micro_batch_size={self.cfg.micro_batch_size}, world_size={self.world_size}); "
                "use more data, fewer workers or a smaller micro_batch_size"
            )

    def batches_per_epoch(self, epoch: int = 0) -> int:
        raise NotImplementedError

    def sample(self, ref: Any) -> Sample:
        raise NotImplementedError

    def _next_rows(self) -> list[list[Any]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return self.collate_rows(self._next_rows())

    def skip(self) -> None:
        """Advance past the next micro-batch without reading its samples (its plan only)."""
        self._next_rows()

    def collate_rows(self, rows: list[list[Any]]) -> dict[str, Any]:
        batch = collate([[self.sample(ref) for ref in row] for row in rows], pad_id=self.cfg.pad_id)
        image_bytes = batch.pop("image_bytes")
        batch["images"] = self._pixels(image_bytes) if image_bytes else None
        batch["num_samples"] = sum(len(row) for row in rows)
        return batch

    def _pixels(self, image_bytes: list[bytes]) -> torch.Tensor:
        from owl.data.image import preprocess_images

        return preprocess_images(image_bytes, self.cfg.image_size, self.cfg.image_mode)


class ShardLoader(CollatingLoader):
    """Yields collated micro-batches for one rank, forever (epoch after epoch).

    Each batch: input_ids, labels, segment_ids, position_ids (B, T) int64, `images`
    (N, 3, S, S) float or None, and `num_samples`.
    """

    def __init__(
        self,
        shards: list[ShardRef],
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
    ) -> None:
        if verify:
            verify_shards(shards)
        elif not shards:
            raise ValueError("no tokenized shards to train on")
        assert 0 <= rank < world_size
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._tables = [map_shard(s.path) for s in shards]
        self._locate, lengths, images, supervised = _index(self._tables)
        self.dropped = Counter()
        keep = np.ones(len(lengths), dtype=bool)
        for reason, bad in (
            ("too_long", lengths > cfg.max_length),
            ("too_many_images", images > cfg.max_images_per_row),
            ("no_supervised_tokens", supervised == 0),
        ):
            self.dropped[f"loader.{reason}"] += int((bad & keep).sum())
            keep &= ~bad
        self._kept = np.flatnonzero(keep)
        self._lengths, self._images = lengths, images
        if len(self._kept) == 0:
            raise ValueError(f"all {len(lengths)} samples were dropped: {dict(self.dropped)}")
        self.epoch, self.offset = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[list[int]] = []
        self._check_batches(len(self._kept))

    @property
    def num_samples(self) -> int:
        return len(self._kept)

    def _rows(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(self._kept)
        if not self.cfg.packing:
            return pad_rows(order.tolist())
        return pack_rows(
            order.tolist(),
            self._lengths,
            self._images,
            max_length=self.cfg.max_length,
            max_images_per_row=self.cfg.max_images_per_row,
            window=self.cfg.packing_window,
        )

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`: lists of sample indices, rows concatenated."""
        if self._plan_epoch != epoch:
            rows = self._rows(epoch)
            size = self.cfg.micro_batch_size
            per_rank = len(rows) // (size * self.world_size)
            batches = [rows[i * size : (i + 1) * size] for i in range(per_rank * self.world_size)]
            self._plan = batches[self.rank :: self.world_size]
            self._plan_epoch = epoch
        return self._plan

    def batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches this rank (and every rank) gets in `epoch`."""
        return len(self._micro_batches(epoch))

    def _next_rows(self) -> list[list[int]]:
        plan = self._micro_batches(self.epoch)
        rows = plan[self.offset]
        self.offset += 1
        if self.offset == len(plan):
            self.epoch, self.offset = self.epoch + 1, 0
        return rows

    def sample(self, index: int) -> Sample:
        shard, row = self._locate[index]
        table = self._tables[shard]
        return Sample(
            input_ids=row_values(table["input_ids"], row),
            labels=row_values(table["labels"], row),
            images=table["images"][row].as_py(),
        )

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            **self._run_state(),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._check_run_state(state)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def map_shard(path: str) -> pa.Table:
    """Memory-map one Arrow IPC file: rows are read from the page cache, not copied up front."""
    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    check_schema(reader.schema, path)
    return reader.read_all()


def _index(
    tables: list[pa.Table],
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
    """(shard, row) per global sample index, and per-sample tokens, images, supervised labels."""
    locate: list[tuple[int, int]] = []
    lengths, images, supervised = [], [], []
    for shard, table in enumerate(tables):
        locate.extend((shard, row) for row in range(table.num_rows))
        lengths.append(pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False))
        images.append(pc.list_value_length(table["images"]).to_numpy(zero_copy_only=False))
        labels = pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False)
        owner = pc.list_parent_indices(table["labels"]).to_numpy(zero_copy_only=False)
        counts = np.bincount(owner[labels != IGNORE_INDEX], minlength=table.num_rows)
        supervised.append(counts)
    return (
        locate,
        np.concatenate(lengths).astype(np.int64),
        np.concatenate(images).astype(np.int64),
        np.concatenate(supervised).astype(np.int64),
    )


def row_values(column: pa.ChunkedArray, row: int) -> np.ndarray:
    # A writable copy: torch refuses to wrap the read-only view of the memory-mapped file.
    return np.array(column[row].values.to_numpy(zero_copy_only=False))
