"""What the runner records lineage through: the `LineageSink` protocol, `NullLineage` (records
nothing: `--dry-run`, tests of the runner alone) and `mlflow_lineage` (pipelines.lineage.Lineage,
which imports mlflow only when called)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from owl.data.manifest import Manifest
from pipelines import cache
from pipelines.jobspec import JobSpec


class LineageSink(Protocol):
    """What the runner records lineage through (`pipelines.lineage.Lineage`, or a no-op)."""

    def start_pipeline(self, job_name: str, execution_id: str, params: dict[str, Any]) -> str: ...
    def end_pipeline(self, ok: bool, metrics: dict[str, float]) -> None: ...
    def start_step(
        self, step: str, key: str, version: str, config: dict[str, Any], hit: bool
    ) -> str: ...
    def log_inputs(self, run_id: str, inputs: dict[str, tuple[str, Path, Manifest]]) -> None: ...
    def finish_step(
        self, run_id: str, manifest: Manifest | None, out_dir: Path, hit: bool, error: str = ""
    ) -> None: ...
    def record_hit(
        self,
        step: str,
        key: str,
        version: str,
        config: dict[str, Any],
        inputs: dict[str, tuple[str, Path, Manifest]],
        manifest: Manifest,
        out_dir: Path,
    ) -> str: ...
    def register_model(
        self,
        name: str,
        model_dir: Path,
        run_id: str,
        digest: str,
        tags: dict[str, str],
        alias: str = "current",
    ) -> tuple[str, str]: ...
    def end_interrupted(self, step_run_id: str, reason: str) -> None: ...


class NullLineage:
    """Records nothing: for `--dry-run` and for tests of the runner alone."""

    def start_pipeline(self, job_name: str, execution_id: str, params: dict[str, Any]) -> str:
        return ""

    def end_pipeline(self, ok: bool, metrics: dict[str, float]) -> None:
        pass

    def start_step(
        self, step: str, key: str, version: str, config: dict[str, Any], hit: bool
    ) -> str:
        return ""

    def log_inputs(self, run_id: str, inputs: dict[str, tuple[str, Path, Manifest]]) -> None:
        pass

    def finish_step(
        self, run_id: str, manifest: Manifest | None, out_dir: Path, hit: bool, error: str = ""
    ) -> None:
        pass

    def record_hit(
        self,
        step: str,
        key: str,
        version: str,
        config: dict[str, Any],
        inputs: dict[str, tuple[str, Path, Manifest]],
        manifest: Manifest,
        out_dir: Path,
    ) -> str:
        return ""

    def register_model(
        self,
        name: str,
        model_dir: Path,
        run_id: str,
        digest: str,
        tags: dict[str, str],
        alias: str = "current",
    ) -> tuple[str, str]:
        return "", ""

    def end_interrupted(self, step_run_id: str, reason: str) -> None:
        pass


def mlflow_lineage(job: JobSpec) -> LineageSink:
    """The MLflow recorder for `job` (imports mlflow only here, through pipelines.lineage)."""
    from pipelines.lineage import Lineage

    job.storage.mkdir(parents=True, exist_ok=True)
    # Two runs creating the same SQLite store at once would race on its schema migrations.
    with cache.lock_for(job.storage, "mlflow", "store"):
        return Lineage(job.mlflow_uri, job.name, job.mlflow_artifacts)
