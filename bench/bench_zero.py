"""Peak memory per rank under ZeRO-3 vs ZeRO-2 (baseline, same invocation), CPU, 2 ranks (gloo).

Each ZeRO stage runs our stage loop (`owl.train.loop.run_training`: model build, DeepSpeed,
loader, checkpoints, export) in 2 processes on the same data and model, stage 2 with everything
trainable, fp32 (CPU). Every rank reads its peak resident memory (VmHWM) at each report: "train"
is the peak before the final checkpoint + export, "end" after them; "held" the parameter elements
the rank held once the model was built (ZeRO-3 builds it partitioned); "after init" the
resident memory and its peak once the model is built and DeepSpeed initialised (before step 1).
Baseline RSS (Python, torch, DeepSpeed imported) is read before the model is built.

    .venv/bin/python bench/bench_zero.py [--hidden 512 --layers 8 --vocab 32000 --steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from owl.data.loader import shards_from_manifest
from owl.model import OwlConfig, get_config
from owl.train.config import TrainConfig

MIB = 1 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Session:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, rank
        self.peaks: list[tuple[int, int]] = []
        self.after_init = (0, 0)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        # The loop asks once the model is built and DeepSpeed initialised, before step 1.
        self.after_init = (_status("VmRSS"), _status("VmHWM"))
        yield None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.peaks.append((int(metrics["step"]), _status("VmHWM")))


def _worker(rank: int, world_size: int, job: Any, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import deepspeed  # noqa: F401  (imported before the baseline is read)

    from owl.train.loop import run_training

    baseline = _status("VmRSS")
    session = _Session(rank, world_size)
    state = run_training(job, session)
    last = state.step
    train_peak = max(p for s, p in session.peaks if s < last)
    result = {
        "rank": rank,
        "baseline_mib": baseline / MIB,
        "init_rss_mib": session.after_init[0] / MIB,
        "init_peak_mib": session.after_init[1] / MIB,
        "train_peak_mib": train_peak / MIB,
        "end_peak_mib": session.peaks[-1][1] / MIB,
        "held_parameters": state.parameters_held,
        "losses": [v for _, v in state.curves["loss"]],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_stage(zero: int, model: OwlConfig, shards: list, args: argparse.Namespace, port: int):
    from owl.train.data_plan import plan_data
    from owl.train.job import WorkerJob

    cfg = TrainConfig(stage=2, trainable="all", log_every=1, seed=0).replace(
        memory={"zero_stage": zero},
        optimizer={"lr": 1e-4},
        schedule={"max_steps": args.steps},
        batch={"micro_batch_size": 1, "max_length": args.max_length},
        checkpoint={"every": args.steps},
        resources={"num_workers": 2},
    )
    job = WorkerJob(train=cfg, model=model, data=plan_data(cfg, model, shards))
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as out:
        mp.spawn(_worker, args=(2, job, port, out), nprocs=2, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    from bench.bench_train import write_data

    model = get_config(
        "demo",
        decoder={
            "hidden": args.hidden, "num_layers": args.layers, "ffn_dim": args.hidden * 8 // 3,
            "vocab_size": args.vocab, "num_heads": 8, "num_kv_heads": 8,
        },
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-zero-data-") as tmp:
        manifest = write_data(Path(tmp), model, count=64, max_length=args.max_length)
        shards = shards_from_manifest(manifest, Path(tmp))
        results = {zero: run_stage(zero, model, shards, args, 29600 + zero) for zero in (2, 3)}
    from owl.model import OwlModel

    with torch.device("meta"):
        params = sum(p.numel() for p in OwlModel(model).parameters())
    print(f"model: {params / 1e6:.1f}M parameters ({4 * params / MIB:.0f} MiB fp32), 2 ranks")
    print("zero rank  baseline  after init (rss/peak)  train peak  end peak  held params  (MiB)")
    for zero, ranks in results.items():
        for r in ranks:
            print(
                f"{zero:>4} {r['rank']:>4} {r['baseline_mib']:>9.0f} {r['init_rss_mib']:>10.0f} /"
                f"{r['init_peak_mib']:>6.0f} {r['train_peak_mib']:>15.0f}"
                f" {r['end_peak_mib']:>9.0f} {r['held_parameters'] / 1e6:>11.1f}M"
            )
    for rank in (0, 1):
        z2, z3 = results[2][rank], results[3][rank]
        ratio = (z3["train_peak_mib"] - z3["baseline_mib"]) / (
            z2["train_peak_mib"] - z2["baseline_mib"]
        )
        print(f"rank {rank}: ZeRO-3 / ZeRO-2 train peak above baseline = {ratio:.2f}x")
    loss2, loss3 = results[2][0]["losses"], results[3][0]["losses"]
    diff = max(abs(a - b) / abs(a) for a, b in zip(loss2, loss3))
    print(f"per-step losses, max relative difference ZeRO-3 vs ZeRO-2: {diff:.1e}")
    print(json.dumps({"parameters": params, "results": results}))


if __name__ == "__main__":
    main()
