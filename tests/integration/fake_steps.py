"""Light fake steps with the real step contract, for the runner's unit and integration tests.

They use the real step names the runner knows (download -> filter -> stage1 -> evaluate), so
model registration and metrics work as with the real DAG. Select them in a process with
OWL_STEPS_TABLE=tests.integration.fake_steps:TABLE (RAY_TABLE: `filter` runs Ray tasks).
Every computation appends a line to `<storage>/calls.log`, so tests can also count executions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from owl.data.manifest import Manifest
from pipelines.dag import Role, StepSpec
from pipelines.step import StepContext, StepInput


def _log_call(ctx: StepContext) -> None:
    storage = Path(ctx.extra["storage"])
    with open(storage / "calls.log", "a") as f:
        f.write(f"{ctx.step} {os.getpid()} {ctx.out_dir.name}\n")
    if (storage / f"fail-{ctx.step}").exists():  # tests make a step fail without a key change
        raise ValueError(f"{ctx.step}: told to fail by {storage / f'fail-{ctx.step}'}")


@dataclass
class SourceConfig:
    num_rows: int = 5
    prefix: str = "row"
    # Transient failures: the first `fail_times` attempts raise (counted under storage).
    fail_times: int = 0
    sleep_s: float = 0.0
    path: str = ""  # a local text file: its lines are the rows (num_rows and prefix unused)


def run_source(ctx: StepContext, cfg: SourceConfig, inputs: dict[str, StepInput]) -> Manifest:
    _log_call(ctx)
    with open(Path(ctx.extra["storage"]) / f"resource-waits-{ctx.step}", "a") as f:
        f.write(f"{ctx.extra.get('resource_wait_s')}\n")  # what the runner gave this attempt
    counter = Path(ctx.extra["storage"]) / f"failures-{ctx.step}"
    failed = int(counter.read_text()) if counter.exists() else 0
    if failed < cfg.fail_times:
        counter.write_text(str(failed + 1))
        raise ConnectionError(f"flaky source, attempt {failed + 1}")
    time.sleep(cfg.sleep_s)
    if cfg.path:
        rows = Path(cfg.path).read_text().splitlines()
    else:
        rows = [f"{cfg.prefix}-{i}" for i in range(cfg.num_rows)]
    (ctx.out_dir / "rows.txt").write_text("".join(f"{r}\n" for r in rows))
    manifest = Manifest(step=ctx.step, stats={"num_rows": float(len(rows))})
    manifest.add_file(ctx.out_dir, "rows.txt", rows=len(rows))
    return manifest


@dataclass
class FilterConfig:
    keep_every: int = 1
    sleep_s: float = 0.0


def _keep(rows: list[str], keep_every: int) -> list[str]:
    return [r for i, r in enumerate(rows) if i % keep_every == 0]


def run_filter(ctx: StepContext, cfg: FilterConfig, inputs: dict[str, StepInput]) -> Manifest:
    _log_call(ctx)
    if cfg.keep_every < 1:
        raise ValueError(f"filter.keep_every must be >= 1, got {cfg.keep_every}")
    rows = inputs["data"].path("rows.txt").read_text().splitlines()
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and ray.is_initialized():
        kept = ray.get(ray.remote(num_cpus=0.5)(_keep).remote(rows, cfg.keep_every))
        nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    else:
        kept, nodes = _keep(rows, cfg.keep_every), 0
    time.sleep(cfg.sleep_s)
    (ctx.out_dir / "kept.txt").write_text("".join(f"{r}\n" for r in kept))
    stats = {"kept": float(len(kept)), "ray_nodes": float(nodes), "num_in": float(len(rows))}
    manifest = Manifest(step=ctx.step, stats={**stats, "num_out": float(len(kept))})
    manifest.dropped = {"filter.keep_every": len(rows) - len(kept)}
    manifest.add_file(ctx.out_dir, "kept.txt", rows=len(kept))
    return manifest


@dataclass
class TrainConfig:
    stage: int = 1
    num_steps: int = 4
    step_sleep_s: float = 0.0


def run_train(ctx: StepContext, cfg: TrainConfig, inputs: dict[str, StepInput]) -> Manifest:
    """Resumable: one checkpoint file per step; a re-run continues after the newest one."""
    _log_call(ctx)
    rows = inputs["data"].path("kept.txt").read_text().splitlines()
    ckpt_dir = ctx.out_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    done = sorted(int(p.stem.split("-")[1]) for p in ckpt_dir.glob("step-*.json"))
    start = done[-1] + 1 if done else 0
    for step in range(start, cfg.num_steps):
        time.sleep(cfg.step_sleep_s)
        loss = 1.0 / (step + 1) + 0.01 * len(rows)
        (ckpt_dir / f"step-{step}.json").write_text(json.dumps({"step": step, "loss": loss}))
        ctx.progress(step + 1, cfg.num_steps, f"loss {loss:.3f}")
    curve = [
        (s, json.loads((ckpt_dir / f"step-{s}.json").read_text())["loss"])
        for s in range(cfg.num_steps)
    ]
    (ctx.out_dir / "model").mkdir(exist_ok=True)
    (ctx.out_dir / "model" / "weights.json").write_text(
        json.dumps({"rows": rows, "loss": curve[-1][1]})
    )
    manifest = Manifest(
        step=ctx.step, stats={"final_loss": curve[-1][1], "resumed_from": float(start)}
    )
    manifest.curves = {"loss": curve}
    manifest.add_file(ctx.out_dir, "model/weights.json")
    return manifest


@dataclass
class EvalConfig:
    metric_scale: float = 1.0


def run_evaluate(ctx: StepContext, cfg: EvalConfig, inputs: dict[str, StepInput]) -> Manifest:
    _log_call(ctx)
    weights = json.loads(inputs["model"].path("model/weights.json").read_text())
    (ctx.out_dir / "predictions.json").write_text(json.dumps(weights["rows"]))
    manifest = Manifest(step=ctx.step, stats={"accuracy": cfg.metric_scale * len(weights["rows"])})
    manifest.add_file(ctx.out_dir, "predictions.json", rows=len(weights["rows"]))
    return manifest


class _Module:
    """A step module made of a Config class and a run function."""

    def __init__(self, config: type, run: object):
        self.Config = config
        self.run = run


MODULES = {
    "download": _Module(SourceConfig, run_source),
    "filter": _Module(FilterConfig, run_filter),
    "stage1": _Module(TrainConfig, run_train),
    "evaluate": _Module(EvalConfig, run_evaluate),
}


class FakeSpec(StepSpec):
    def load_module(self) -> _Module:  # type: ignore[override]
        return MODULES[self.name]


TABLE: dict[str, StepSpec] = {
    "download": FakeSpec("download", __name__, "1", uses_ray=False),
    "filter": FakeSpec("filter", __name__, "1", {"data": Role("download")}, uses_ray=False),
    "stage1": FakeSpec(
        "stage1", __name__, "1", {"data": Role("filter")}, resumable=True, uses_model=True,
        uses_seed=True, uses_ray=False, fixed={"stage": 1},
    ),
    "evaluate": FakeSpec("evaluate", __name__, "1", {"model": Role("stage1")}, uses_model=True, uses_ray=False),
}  # fmt: skip

# The same steps, with `filter` running its work as a Ray task (the runner connects to Ray first).
RAY_TABLE: dict[str, StepSpec] = {**TABLE, "filter": replace(TABLE["filter"], uses_ray=True)}

# Two training stages, like the real DAG: stage2 starts from stage1 and is the job's final model.
MODULES["stage2"] = _Module(TrainConfig, run_train)
TWO_STAGE_TABLE: dict[str, StepSpec] = {
    **{name: TABLE[name] for name in ("download", "filter", "stage1")},
    "stage2": FakeSpec(
        "stage2", __name__, "1", {"data": Role("filter"), "init": Role("stage1")}, resumable=True,
        uses_model=True, uses_seed=True, uses_ray=False, fixed={"stage": 2},
    ),
    "evaluate": replace(TABLE["evaluate"], roles={"model": Role("stage2")}),
}  # fmt: skip


def fake_job(name: str, storage: Path | str, **sections: Any) -> dict[str, Any]:
    """A raw job over TABLE's steps: small defaults, each section dict merged over its default,
    any other value (e.g. mlflow_uri) set as given."""
    raw: dict[str, Any] = {
        "name": name,
        "storage": str(storage),
        "model": {"name": "debug-tiny"},
        "download": {"num_rows": 6},
        "filter": {"keep_every": 2},
        "stage1": {"num_steps": 3},
        "evaluate": {},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw
