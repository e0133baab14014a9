"""The contract between the runner and the step modules.

A step is a function `run(ctx, cfg, inputs) -> Manifest`:
- `ctx.out_dir` is the step's own directory `<storage>/steps/<step>/<key>/`; the step writes every
  output file under it and lists them in the returned manifest (`Manifest.add_file`). The runner
  writes the manifest last, atomically: that is the commit marker.
- `inputs` maps each upstream step name to its committed output (directory + manifest).
- The step is pure: same inputs + config + code version -> same outputs. It does not talk to
  MLflow; it returns statistics, curves and info in the manifest and the runner records them.
- A step may use Ray (tasks, Ray Data, Ray Train): the runner has connected to the cluster.
- A resumable step (training) finds its earlier checkpoints under `ctx.out_dir` on a re-run with
  the same key; other steps get an emptied `ctx.out_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl.data.manifest import Manifest
from owl.model.config import OwlConfig


@dataclass(frozen=True)
class Resources:
    """What a step asks of the cluster. Training: one Ray Train worker per `num_workers`."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class StepInput:
    name: str
    dir: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        return self.dir / rel


@dataclass
class StepContext:
    step: str
    out_dir: Path
    job_name: str
    model: OwlConfig
    resources: Resources = field(default_factory=Resources)
    seed: int = 0
    # Called by long steps to report progress: (done, total or None, message).
    progress: Callable[[float, float | None, str], None] = lambda done, total, msg: None
    extra: dict[str, Any] = field(default_factory=dict)
