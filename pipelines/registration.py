"""After the last step of an execution: the model it registers in MLflow, the metrics it reports,
and the commands / URLs that show both (the runner calls these once every step is done)."""

from __future__ import annotations

from owl.data.manifest import Manifest
from pipelines import cache
from pipelines.cache import ExecutionRecord
from pipelines.dag import METRICS_FROM, REGISTER_FROM
from pipelines.jobspec import JobSpec
from pipelines.mlflow_links import model_version_url, run_url, ui_base
from pipelines.sink import LineageSink


def register_model(
    job: JobSpec,
    lineage: LineageSink,
    execution: ExecutionRecord,
    manifests: dict[str, Manifest],
    run_ids: dict[str, str],
) -> tuple[dict[str, str], str]:
    """Register the newest model this run produced: ({name, version} or {}, the alias it moved or
    ""). Only the job's final model (its last training stage) moves the alias; a partial run
    (`--until stage1`) registers a version without touching it."""
    final = next((s for s in REGISTER_FROM if s in manifests), None)
    if final is None:
        return {}, ""
    job_final = next((s for s in REGISTER_FROM if s in job.steps), None)
    is_final = final == job_final
    manifest = manifests[final]
    tags = {
        "owl.job": job.name,
        "owl.pipeline_run_id": execution.mlflow_run_id,
        "owl.execution_id": execution.execution_id,
        "owl.model_step": final,
    }
    for step, m in manifests.items():
        tags[f"owl.digest.{step}"] = m.digest
        if step in REGISTER_FROM:
            tags[f"owl.run.{step}"] = run_ids.get(step, "")
    model_dir = cache.step_dir(job.storage, final, manifest.key) / "model"
    # Concurrent runs of one job register the same output once (see Lineage.register_model).
    with cache.lock_for(job.storage, "register", manifest.digest):
        name, version = lineage.register_model(
            job.name, model_dir, run_ids.get(final, ""), manifest.digest, tags,
            alias="current" if is_final else "",
        )  # fmt: skip
    alias = "current" if name and is_final else ""
    return ({"name": name, "version": version} if name else {}), alias


def execution_metrics(manifests: dict[str, Manifest]) -> dict[str, float]:
    """The final evaluation's metrics as they are, earlier evaluations' prefixed by step."""
    sources = [s for s in METRICS_FROM if s in manifests]
    metrics: dict[str, float] = {}
    for rank, source in enumerate(sources):
        prefix = "" if rank == 0 else f"{source}."
        metrics.update({prefix + k: v for k, v in manifests[source].stats.items()})
    return metrics


def where_to_look(
    job: JobSpec, lineage: LineageSink, mlflow_run_id: str, model: dict[str, str], alias: str
) -> list[str]:
    """The commands / URLs that show this run and its model in MLflow."""
    uri = job.mlflow_uri
    if not mlflow_run_id:
        return []
    experiment = getattr(lineage, "experiment_id", "")
    base = ui_base(uri)
    run = run_url(base, experiment, mlflow_run_id)
    if uri.startswith(("http://", "https://")):
        lines = [f"run: {run}"]
        if model:
            lines.append(f"model: {model_version_url(base, model['name'], model['version'])}")
    else:
        lines = [f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000, then {run}"]
    if model:
        ref = f"{model['name']}@{alias}" if alias else f"{model['name']}/{model['version']}"
        lines.append(f"lineage: owl audit model {ref} --mlflow-uri {uri}")
    return lines
