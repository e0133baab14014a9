"""The resumable training loader over tokenized Arrow shards.

Stages, in order: verify shards against the manifest -> index sample lengths -> drop (and count)
samples that cannot be trained on -> per-epoch seeded shuffle -> pack into rows (or one sample
per row) -> group rows into micro-batches -> deal micro-batches to ranks -> collate + images.

The whole plan of an epoch is a pure function of (seed, epoch), so every rank computes the same
plan without talking to the others, each takes a disjoint share (micro-batch j goes to rank
j % world_size), all ranks get the same number of micro-batches, and `(epoch, offset)` is enough
to continue with the exact next micro-batch after a restart.
"""

from __future__ import annotations

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


def shards_from_manifest(manifest: Manifest, directory: str | Path) -> list[ShardRef]:
    """The tokenized `.arrow` shards a manifest lists, as absolute paths with their digests."""
    return [
        ShardRef(path=str(Path(directory) / e.path), sha256=e.sha256)
        for e in sorted(manifest.files, key=lambda e: e.path)
        if e.path.endswith(".arrow")
    ]


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


class ShardLoader:
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
        self._tables = [_read_shard(s.path) for s in shards]
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
        if self.batches_per_epoch(0) == 0:
            raise ValueError(
                f"{len(self._kept)} samples make fewer micro-batches than one per worker "
                f"(micro_batch_size={cfg.micro_batch_size}, world_size={world_size}); "
                "use more data, fewer workers or a smaller micro_batch_size"
            )

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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        plan = self._micro_batches(self.epoch)
        rows = plan[self.offset]
        self.offset += 1
        if self.offset == len(plan):
            self.epoch, self.offset = self.epoch + 1, 0
        return self.collate_rows(rows)

    def collate_rows(self, rows: list[list[int]]) -> dict[str, Any]:
        batch = collate([[self.sample(i) for i in row] for row in rows], pad_id=self.cfg.pad_id)
        image_bytes = batch.pop("image_bytes")
        batch["images"] = self._pixels(image_bytes) if image_bytes else None
        batch["num_samples"] = sum(len(row) for row in rows)
        return batch

    def _pixels(self, image_bytes: list[bytes]) -> torch.Tensor:
        from owl.data.image import preprocess_images

        return preprocess_images(image_bytes, self.cfg.image_size, self.cfg.image_mode)

    def sample(self, index: int) -> Sample:
        shard, row = self._locate[index]
        table = self._tables[shard]
        return Sample(
            input_ids=_row_values(table["input_ids"], row),
            labels=_row_values(table["labels"], row),
            images=table["images"][row].as_py(),
        )

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "rank", "world_size", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has "
                    f"{key}={getattr(self, key)}; resume with the same data, seed and workers"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    @property
    def seed(self) -> int:
        return self.cfg.seed


def _read_shard(path: str) -> pa.Table:
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


def _row_values(column: pa.ChunkedArray, row: int) -> np.ndarray:
    # A writable copy: torch refuses to wrap the read-only view of the memory-mapped file.
    return np.array(column[row].values.to_numpy(zero_copy_only=False))
