"""The filter step's CLIP-score rule on Ray Data actors: each actor loads the CLIP folder once and
scores whole shards (the samples that survived every other rule), `batch_size` samples a forward.

A shard's samples are cut into batches in key order and captions are padded to CLIP's full
context, so a sample's score does not depend on which actor scored it or on what else was
running: a re-run keeps and drops exactly the same samples. One actor per GPU when the cluster
has GPUs, else `num_actors` CPU actors (1 CPU each, so torch uses one thread per actor).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCORE_SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32())])


class ShardScorer:
    """Ray Data callable class: (work_file, drop) rows -> (key, clip_score) of the kept samples."""

    def __init__(self, folder: str, batch_size: int, device: str) -> None:
        from owl.data.clip_score import ClipScorer

        self.scorer = ClipScorer(folder, device=device)
        self.batch_size = batch_size

    def __call__(self, shards: pa.Table) -> pa.Table:
        tables = [SCORE_SCHEMA.empty_table()]
        for work_file, drop in zip(shards["work_file"].to_pylist(), shards["drop"].to_pylist()):
            tables.append(self.score_shard(Path(work_file), set(drop)))
        return pa.concat_tables(tables)

    def score_shard(self, work_file: Path, drop: set[str]) -> pa.Table:
        table = pq.read_table(work_file, columns=["key", "image", "caption"]).sort_by("key")
        keys = table.column("key").to_pylist()
        table = table.filter(pa.array([k not in drop for k in keys], pa.bool_()))
        scores = []
        for start in range(0, table.num_rows, self.batch_size):
            batch = table.slice(start, self.batch_size)
            scores.extend(
                self.scorer.scores(batch["image"].to_pylist(), batch["caption"].to_pylist())
            )
        return pa.table(
            {"key": table.column("key"), "clip_score": pa.array(scores, pa.float32())},
            schema=SCORE_SCHEMA,
        )


def clip_scores(
    shards: list[dict], folder: str, batch_size: int, num_actors: int
) -> dict[str, float]:
    """key -> CLIP score of every sample in `shards` ({work_file, drop} each) not in its `drop`."""
    import ray
    import ray.data

    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = num_gpus > 0
    size = max(1, min(num_gpus if on_gpu else num_actors, len(shards)))
    ds = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
        ShardScorer,
        fn_constructor_kwargs={"folder": folder, "batch_size": batch_size,
                               "device": "cuda" if on_gpu else "cpu"},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_gpus=1 if on_gpu else 0,
        num_cpus=1,
    )  # fmt: skip
    scores: dict[str, float] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        scores.update(zip(batch["key"].to_pylist(), batch["clip_score"].to_pylist()))
    return scores
