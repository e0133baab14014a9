"""`owl status`: per step of the job's current plan its state, duration, key and MLflow run id;
the newest registered model and evaluation metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from owl.data.manifest import Manifest
from owl.train.config import mixture_weights
from pipelines import cache
from pipelines.cache import StepRecord
from pipelines.jobspec import JobSpec, StepSection, resolve_tracking_uri
from pipelines.plan import PlannedStep, plan


def tracking_source(job: JobSpec) -> str:
    """Where the job's MLflow tracking URI comes from: the job file, the environment, or the
    default SQLite store under storage (pipelines.jobspec.resolve_tracking_uri)."""
    return resolve_tracking_uri(job.raw.get("mlflow_uri") or "", job.storage)[1]


def _mixture(section: StepSection) -> dict[str, float]:
    """{dataset: weight} of a training stage that mixes ({} otherwise), its `data` input first."""
    if not section.spec.trains:
        return {}
    return mixture_weights(section.config.data.mix, section.config.data.data_weight)


def _drawn(job: JobSpec, planned: PlannedStep) -> dict[str, int]:
    """{dataset: samples trained on} from a committed training stage that mixes; {} otherwise."""
    if not (planned.cached and planned.key and job.steps[planned.name].spec.trains):
        return {}
    manifest = Manifest.read(cache.step_dir(job.storage, planned.name, planned.key))
    return {name: entry["drawn"] for name, entry in manifest.info.get("mixture", {}).items()}


def job_status(job: JobSpec) -> dict[str, Any]:
    """Per step of the job's current plan: state, duration, key, MLflow run id (from the newest
    record with that key); the newest registered model and evaluation metrics."""
    executions = cache.read_executions(job.storage, job.name)
    latest: dict[tuple[str, str], StepRecord] = {}
    for execution in executions:
        for record in cache.read_step_records(job.storage, execution.execution_id):
            latest[(record.step, record.key)] = record
    steps = []
    for planned in plan(job, estimate_memory=False):
        record = latest.get((planned.name, planned.key or ""))
        state = record.state if record else ("done" if planned.cached else "pending")
        if planned.cached and state in ("running", "failed", "interrupted"):
            state = "done"  # committed meanwhile (e.g. by a concurrent run)
        steps.append(
            {
                "step": planned.name,
                "state": state,
                "cached": planned.cached,
                "key": planned.key or "",
                "duration_s": record.duration_s if record else 0.0,
                "mlflow_run_id": record.mlflow_run_id if record else "",
                "attempts": record.attempts if record else 0,
                "error": record.error if record else "",
                # e.g. an unreadable manifest: the next `owl run` recomputes that step
                "problems": planned.problems,
                # a training stage drawing several datasets: {dataset: weight}, `data` first
                "mixture": _mixture(job.steps[planned.name]),
                # ... and the samples of each it trained on, once it has run
                "drawn": _drawn(job, planned),
            }
        )
    finished = [e for e in executions if e.state == "done"]
    last = executions[-1] if executions else None
    return {
        "job": job.name,
        "storage": str(job.storage),
        "mlflow_uri": job.mlflow_uri,
        "mlflow_uri_from": tracking_source(job),
        "last_execution": dataclasses.asdict(last) if last else None,
        "steps": steps,
        "registered_model": finished[-1].registered_model if finished else {},
        "metrics": finished[-1].metrics if finished else {},
    }
