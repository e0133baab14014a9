"""Run a training stage (`owl.train.loop.run_training`) on W local processes (gloo, CPU), from
scratch or from a checkpoint, and collect what each step did: used by the elastic-resume tests
(tests/integration/test_elastic_resume.py) and their benchmark (bench/bench_elastic.py).

Every rank records, per optimizer step, the sample references of the micro-batches it trained on;
rank 0 records the per-step loss (all-reduced by the loop) and how long the restore took.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from owl.train.data_plan import DataPlan
from owl.train.job import LocalSession, WorkerJob


class _Session(LocalSession):
    """LocalSession for rank `rank` of W: checkpoints copied into `checkpoint_root/step-N` (every
    rank's files into the same folder, as Ray Train merges them); times the restore."""

    restore_s: float = 0.0

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        started = time.perf_counter()
        yield self.resume_from
        self.restore_s = time.perf_counter() - started


def _record_samples(stream: Any, log: list[list[str]]) -> None:
    """Wrap each loader's collate: log the sample references of every micro-batch it collates."""
    for loader in stream.loaders.values():
        collate = loader.collate_rows

        def logged(rows: list, collate: Any = collate) -> dict:
            log.append([repr(ref) for row in rows for ref in row])
            return collate(rows)

        loader.collate_rows = logged


def _worker(
    rank: int, world_size: int, job: WorkerJob, port: int, out: str, tmp: str, resume: str
) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import deepspeed.comm

    from owl.train import loop

    session = _Session(
        Path(out) / "checkpoints", Path(resume) if resume else None, rank, world_size
    )
    micro: list[list[str]] = []
    build = DataPlan.stream

    def recording(plan: DataPlan, rank: int, world_size: int) -> Any:
        stream = build(plan, rank, world_size)
        _record_samples(stream, micro)
        return stream

    DataPlan.stream = recording  # this process only: it exits after the run
    state = loop.run_training(job, session)
    per_step = len(micro) // max(1, state.step - state.resumed_from_step)
    result = {
        "rank": rank,
        "samples": [sum(micro[i : i + per_step], []) for i in range(0, len(micro), per_step)],
        "loss": state.curves["loss"],
        "restore_s": session.restore_s,
        # DeepSpeed started without compiling its shm op (owl/train/deepspeed_cpu.py)
        "shm_op": getattr(deepspeed.comm.comm.cdb, "shm_comm_op", None) is not None,
    }
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:  # what the stage's manifest reports (curves, tokens, samples): rank 0's state
        totals = {"curves": state.curves, "tokens": state.tokens, "samples": state.samples}
        Path(out, "state.json").write_text(json.dumps(totals))
    dist.destroy_process_group()


def run(job: WorkerJob, world_size: int, out: Path, *, resume: Path | None = None, port: int):
    """Run `job` on `world_size` processes; checkpoints go to `out/checkpoints/step-N`, rank 0's
    final curves and counts to `out/state.json`. Returns (per-step sample references of all ranks
    together, [(step, loss)], restore seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="elastic-") as tmp:
        args = (world_size, job, port, str(out), tmp, str(resume or ""))
        mp.spawn(_worker, args=args, nprocs=world_size)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]
    assert not any(r["shm_op"] for r in ranks), "DeepSpeed built its shm op: skip_shm_comm?"
    samples = [sorted(sum(step, [])) for step in zip(*(r["samples"] for r in ranks))]
    loss = [tuple(p) for p in ranks[0]["loss"]]
    return samples, loss, max(r["restore_s"] for r in ranks)
