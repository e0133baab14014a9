"""What a training worker is given and how it talks to its launcher: `WorkerJob` (the stage's
config, model config, data plan and starting model folder, picklable), the `Session` protocol
(Ray Train's is `pipelines/steps/_ray_train.py`; `LocalSession` runs the loop in one process, for
benchmarks and debugging) and the fault injection tests use. The loop itself is
`owl.train.loop.run_training`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch.distributed as dist

from owl.model.config import OwlConfig
from owl.train import checkpoint
from owl.train.config import TrainConfig
from owl.train.data_plan import DataPlan

# Fault injection, for tests only: OWL_FAULT_INJECTION=STEP:RANK:MODE makes worker rank RANK
# fail at optimizer step STEP of a run that did not start from a checkpoint; MODE `raise` raises,
# `kill` sends SIGKILL to its own process. Read by the driver (`Fault.from_env`), carried to the
# workers in `WorkerJob.fault`.
FAULT_ENV = "OWL_FAULT_INJECTION"


@dataclass(frozen=True)
class Fault:
    step: int
    rank: int = 0
    mode: Literal["raise", "kill"] = "raise"

    @classmethod
    def from_env(cls) -> Fault | None:
        text = os.environ.get(FAULT_ENV, "")
        if not text:
            return None
        step, rank, mode = (text.split(":") + ["", ""])[:3]
        if not (step.isdigit() and rank.isdigit() and mode in ("raise", "kill")):
            raise ValueError(f"{FAULT_ENV}={text!r}: expected STEP:RANK:raise|kill, e.g. 3:1:kill")
        return cls(int(step), int(rank), mode)  # type: ignore[arg-type]


@dataclass
class WorkerJob:
    """What every worker needs, picklable. Paths must be readable from every worker."""

    train: TrainConfig
    model: OwlConfig
    data: DataPlan  # owl.train.data_plan.plan_data: what the stage reads and how
    init_model_dir: str = ""  # a folder `owl.model.load_model` reads; empty = fresh init
    fault: Fault | None = None  # tests only (FAULT_ENV)
    # With `train.evaluate.every`: rank 0 writes the model of every such step to
    # `<eval_dir>/step-N/model` (before that step's checkpoint) for the driver's evaluation.
    eval_dir: str = ""


class Session(Protocol):
    """How the loop talks to its launcher (Ray Train, or a plain process in tests/benchmarks)."""

    rank: int
    world_size: int

    def restore_dir(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint directory to resume from, if any."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Hand metrics (and a checkpoint written by this rank) to the launcher; all ranks call it."""
        ...


@dataclass
class LocalSession:
    """A single-process `Session` (world size 1) for benchmarks and debugging: checkpoints are
    copied into `checkpoint_root/step-N`, metrics appended to `reports`."""

    checkpoint_root: Path
    resume_from: Path | None = None
    rank: int = 0
    world_size: int = 1
    reports: list[dict[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import shutil

        self.reports.append(dict(metrics, time=time.time()))
        if checkpoint_dir is not None:
            target = self.checkpoint_root / checkpoint.step_dir_name(int(metrics["step"]))
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)


def init_single_process_group(port: int = 29517, backend: str = "gloo") -> None:
    """A world of one for running the loop outside Ray (DeepSpeed needs a process group): gloo
    on CPU, `backend="nccl"` on a GPU (after `torch.cuda.set_device`)."""
    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group(backend, rank=0, world_size=1)
