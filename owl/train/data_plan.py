"""A training stage's data plan: what it reads and how, in one place.

`plan_data` is the one entry: from the stage's config (`batch`, `data`, `resources.num_workers`),
the model (image size and mode, pad id) and the stage's shards (its `data` input, and the shards
of each `data.mix` dataset, which the train step finds in the job's inputs) it gives a
`DataPlan`: the datasets and their weights, the loader kind and its settings, and the shape of
the stage's sample stream (`resources.num_workers` streams x `batch.grad_accum` micro-batches per
optimizer step, owl.data.step_stream). The train step builds the plan on the driver and checks
it there (`driver_loader`: enough data for every stream; the global loader also checks every
digest and counts its drops); each worker builds its share of the stream from the same plan
(`stream`). Plain data, picklable: it travels to the workers in `owl.train.job.WorkerJob`.
"""

from __future__ import annotations

from dataclasses import dataclass

from owl.data.loader import LoaderConfig, ShardLoader, ShardRef
from owl.data.step_stream import StepStream
from owl.data.streaming import Dataset, StreamingLoader
from owl.model.config import OwlConfig
from owl.train.config import TrainConfig


@dataclass(frozen=True)
class DataPlan:
    """The stage's data: `shards` (its `data` input), with a mix `datasets` (the `data` input
    first, then each `data.mix` entry, with their weights; empty without a mix), read by the
    `kind` loader with `loader_cfg`, dealt to `num_streams` streams of `grad_accum` micro-batches
    per optimizer step."""

    shards: list[ShardRef]
    datasets: list[Dataset]
    loader_cfg: LoaderConfig
    kind: str  # "streaming" or "global" (TrainConfig.data.loader)
    num_streams: int
    grad_accum: int
    # Whether the workers' loaders check the sha256 of the shards they read: the streaming loader
    # checks each shard where and when it first opens it; the global one is checked once, by the
    # driver's loader (`driver_loader`), and its workers read the same files.
    verify_in_workers: bool = True

    def loader(
        self, stream: int, num_streams: int, *, verify: bool
    ) -> ShardLoader | StreamingLoader:
        """The loader of stream `stream` of `num_streams`."""
        if self.kind == "streaming":
            source = self.datasets or self.shards
            return StreamingLoader(
                source, self.loader_cfg, rank=stream, world_size=num_streams, verify=verify
            )
        return ShardLoader(
            self.shards, self.loader_cfg, rank=stream, world_size=num_streams, verify=verify
        )

    def driver_loader(self) -> ShardLoader | StreamingLoader:
        """Stream 0's loader, built on the driver before any worker starts: it refuses a dataset
        too small for every stream; the global loader also checks every shard's digest and
        counts the samples it drops (`.dropped`)."""
        return self.loader(0, self.num_streams, verify=True)

    def stream(self, rank: int, world_size: int) -> StepStream:
        """Worker `rank` of `world_size`'s share of the stage's sample stream: the loaders of the
        streams it reads, whatever the number of workers running."""

        def make(stream: int, num_streams: int) -> ShardLoader | StreamingLoader:
            return self.loader(stream, num_streams, verify=self.verify_in_workers)

        return StepStream(
            make,
            num_streams=self.num_streams,
            grad_accum=self.grad_accum,
            rank=rank,
            world_size=world_size,
        )

    def dataset_names(self) -> list[str]:
        """The mixed datasets' names in the loader's order ([] without a mix)."""
        return [d.name for d in self.datasets if d.shards]


def plan_data(
    cfg: TrainConfig,
    model: OwlConfig,
    shards: list[ShardRef],
    mixed: dict[str, list[ShardRef]] | None = None,
) -> DataPlan:
    """The stage's data plan. `mixed`: the shards of each `cfg.data.mix` entry, by its key."""
    mixed = mixed or {}
    assert set(mixed) == set(cfg.data.mix), (sorted(mixed), sorted(cfg.data.mix))
    datasets = []
    if cfg.data.mix:
        datasets = [Dataset(shards, cfg.data.data_weight, "data")]
        datasets += [Dataset(mixed[key], weight, key) for key, weight in cfg.data.mix.items()]
    batch = cfg.batch
    loader_cfg = LoaderConfig(
        micro_batch_size=batch.micro_batch_size,
        max_length=batch.max_length,
        max_images_per_row=batch.max_images_per_row,
        packing=batch.packing,
        packing_window=batch.packing_window,
        seed=cfg.seed,
        pad_id=model.decoder.pad_token_id,
        image_size=model.vision.image_size,
        image_mode=model.image_mode,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    return DataPlan(
        shards=shards,
        datasets=datasets,
        loader_cfg=loader_cfg,
        kind=cfg.data.loader,
        num_streams=cfg.resources.num_workers,
        grad_accum=batch.grad_accum,
        verify_in_workers=cfg.data.loader == "streaming",
    )
