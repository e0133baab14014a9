"""What an elastic resume costs: restoring a checkpoint on another number of workers (DeepSpeed's
universal checkpoint: convert once, then load re-partitioned) vs on the same number (baseline,
same invocation). CPU, gloo, fp32, the `demo` model size with every parameter trainable.

A 2-worker run saves a checkpoint after step 1; it is then resumed (one more step) on 2 workers
(same W) and on 1 worker (W' != W, from a fresh copy, so the conversion is timed too). The time
is the restore alone (`checkpoint.load`: conversion, DeepSpeed load, owl's repair of the ZeRO-3
load, loader states), the slowest rank's, under ZeRO-2 and under ZeRO-3.

    .venv/bin/python bench/bench_elastic.py [--model demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the run harness the tests use


def measure(zero: int, model_name: str, tmp: Path, port: int) -> dict[str, float]:
    from elastic_runs import run

    from bench.bench_train import write_data
    from owl.data.loader import shards_from_manifest
    from owl.model import get_config
    from owl.train.config import TrainConfig
    from owl.train.data_plan import plan_data
    from owl.train.job import WorkerJob

    model = get_config(model_name)
    manifest = write_data(tmp / "data", model, count=64, max_length=128)
    shards = shards_from_manifest(manifest, tmp / "data")
    cfg = TrainConfig(stage=2, trainable="all", log_every=1, seed=0).replace(
        memory={"zero_stage": zero},
        optimizer={"lr": 1e-4},
        schedule={"max_steps": 1},
        batch={"micro_batch_size": 2, "max_length": 128},
        checkpoint={"every": 1},
        resources={"num_workers": 2},
    )
    job = WorkerJob(train=cfg, model=model, data=plan_data(cfg, model, shards))
    run(job, 2, tmp / "first", port=port)
    saved = tmp / "first" / "checkpoints" / "step-00000001"
    resumed = dataclasses.replace(job, train=cfg.replace(schedule={"max_steps": 2}))
    times = {}
    for world_size in (2, 1):
        copy = tmp / f"copy{world_size}"
        shutil.copytree(saved, copy)
        *_, restore_s = run(resumed, world_size, tmp / f"w{world_size}", resume=copy, port=port + 1)
        times[world_size] = restore_s
        port += 1
    size = sum(f.stat().st_size for f in (saved / "ds").rglob("*") if f.is_file())
    return {"same_w_s": times[2], "elastic_s": times[1], "checkpoint_mib": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    print("zero  checkpoint  restore 2->2 (s)  restore 2->1 (s)  ratio")
    for zero, port in ((2, 29700), (3, 29710)):
        with tempfile.TemporaryDirectory(prefix="bench-elastic-") as tmp:
            r = measure(zero, args.model, Path(tmp), port)
        print(
            f"{zero:>4} {r['checkpoint_mib']:>8.0f} MiB {r['same_w_s']:>16.2f}"
            f" {r['elastic_s']:>17.2f} {r['elastic_s'] / r['same_w_s']:>6.1f}x"
        )


if __name__ == "__main__":
    main()
