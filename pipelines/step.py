"""The contract between the runner and the step modules.

A step is a function `run(ctx, cfg, inputs) -> Manifest`:
- `ctx.out_dir` is the step's own directory `<storage>/steps/<step>/<key>/`; the step writes every
  output file under it and lists them in the returned manifest (`Manifest.add_file`). The runner
  writes the manifest last, atomically: that is the commit marker.
- `inputs` maps each *role* the step declares to the committed output (directory + manifest) of
  the upstream step that fills it, e.g. stage 2 gets {"data": tokenize_instructions,
  "init": stage1, "tokenizer": tokenizer}. Roles per step are listed in `pipelines/dag.py`.
- Paths in a step's config may start with `@<role>/` (e.g. `@shapes/captions.parquet`): they are
  relative to that input's directory; `resolve_path` turns them into real paths.
- The step is pure: same inputs + config + code version -> same outputs. It does not talk to
  MLflow; it returns statistics, curves and info in the manifest and the runner records them.
- A step may use Ray (tasks, Ray Data, Ray Train): the runner has connected to the cluster.
- A resumable step (training) finds its earlier checkpoints under `ctx.out_dir` on a re-run with
  the same key; other steps get an emptied `ctx.out_dir`.
- The module imports torch, Ray, transformers, DeepSpeed, img2dataset... inside the functions that
  compute, not at module level: validating a job imports every step module for its `Config`, and
  a fully cached `owl run` imports nothing more (tests/unit/test_cached_rerun.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl.data.manifest import Manifest
from owl.model.config import OwlConfig

# The statistic in which a data step reports how many samples it wrote (download, filter,
# tokenize_*): zero fails the step unless its section says `allow_empty: true`.
OUTPUT_COUNTS = ("num_images", "num_out", "samples_out")
# ... and the one saying how many came in, for the message.
INPUT_COUNTS = ("num_urls", "num_in", "samples_in")


class EmptyOutput(ValueError):
    """A data step kept nothing: training on it would be training on nothing."""


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


def resolve_path(path: str, inputs: dict[str, StepInput]) -> str:
    """`@role/rel/path` -> the path inside that input's directory; anything else is returned as is."""
    if not path.startswith("@"):
        return path
    role, _, rel = path[1:].partition("/")
    if role not in inputs:
        raise ValueError(
            f"{path}: refers to input {role!r}, but this step's inputs are {sorted(inputs)}"
        )
    return str(inputs[role].dir / rel)


def check_output(name: str, manifest: Any, out_dir: Path) -> None:
    """What a step returned is a Manifest whose files are all under `out_dir`."""
    if not isinstance(manifest, Manifest):
        raise TypeError(f"step {name} returned {type(manifest).__name__}, expected a Manifest")
    problems = manifest.verify(out_dir)
    if problems:
        raise RuntimeError(
            f"step {name}: its manifest lists files that are not there: {problems[:5]}"
        )


def check_not_empty(name: str, manifest: Manifest) -> None:
    """Raise EmptyOutput when a data step reports that it kept no sample, saying why."""
    count = next((k for k in OUTPUT_COUNTS if k in manifest.stats), None)
    if count is None or manifest.stats[count] > 0:
        return
    given = next((k for k in INPUT_COUNTS if k in manifest.stats), None)
    read = f" of {manifest.stats[given]:g} read ({given})" if given else ""
    reasons = sorted(manifest.dropped.items(), key=lambda kv: -kv[1])
    why = ", ".join(f"{k}={v}" for k, v in reasons) if reasons else "no input rows"
    raise EmptyOutput(
        f"step {name} kept no samples{read}; dropped by reason: {why}. Fix the inputs, or set "
        f"`{name}: {{allow_empty: true}}` in the job to continue with an empty output"
    )
