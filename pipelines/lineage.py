"""Lineage in MLflow: what a pipeline execution records.

One parent run per pipeline execution; one child run per step (its config as params, cache key,
code version, hit/miss, git commit, Ray submission id as tags; its inputs as MLflow datasets whose
digest is the manifest digest cut to MLflow's 36 characters, with the full sha256 and the
producer run id as input tags; statistics and drop counts as metrics, curves as step-wise metrics,
the manifest and plots as artifacts). The final model is an MLflow 3 *external* LoggedModel (the
weights stay in the pipeline storage) registered in the model registry with an alias.
pipelines.audit walks this graph back (`owl audit`, `owl compare`); these two modules are the only
ones that import mlflow.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from owl.data.manifest import MANIFEST_NAME, Manifest
from pipelines.errors import UserError

# MLflow limits (mlflow/utils/validation.py): dataset digest 36 chars, param value 6000 chars,
# 100 params / 100 tags / 1000 metrics per batch call.
DIGEST_CHARS = 36
PARAM_VALUE_CHARS = 6000
CARD_CHARS = 5000  # what we keep of a model card as the model version's description
_BATCH = 100
TAG = "owl."
# The MLflow UI's experiment kind (the tag its front end reads): a model-training experiment, so it
# opens on runs and models, not on the GenAI evaluation views.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def is_auth_error(exc: MlflowException) -> bool:
    """The server refused the credentials (or got none): 401 / 403."""
    text = str(exc)
    return exc.error_code in _AUTH_CODES or "error code 401" in text or "error code 403" in text


def auth_message(uri: str) -> str:
    who = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if who:
        return (
            f"the MLflow server at {uri} refused user {who!r}: check MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD and the user's permission on the experiment"
        )
    return (
        f"the MLflow server at {uri} requires credentials: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
    )


def check_store(uri: str, create: bool) -> None:
    """A SQLite store that does not exist yet is only created by a run (`create`); reading one
    that is not there is an error instead of a new empty database."""
    if not uri.startswith("sqlite:///") or create:
        return
    path = Path(uri[len("sqlite:///") :])
    if not path.is_file():
        raise UserError(
            f"no MLflow store at {path}: no run of this job has recorded there yet (the job's "
            "storage is resolved from the current folder: run from the folder you ran the job "
            "in, or pass --set storage=PATH)"
        )


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {'a.b.c': 'value'} with values stringified and cut to MLflow's limit."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, child in value.items():
            flat.update(flatten(child, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)[:PARAM_VALUE_CHARS]}


@functools.cache
def git_commit() -> str:
    """The project's git commit: from the checkout, or OWL_GIT_COMMIT (set by `owl submit`)."""
    if os.environ.get("OWL_GIT_COMMIT"):
        return os.environ["OWL_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


class Lineage:
    """Records one pipeline execution in MLflow."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        # MLflow would print a "View run ... at: URL" line per run it ends (over HTTP); owl prints
        # where to look once, in its summary.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)  # the registry and LoggedModel APIs read it
        # ... and MLflow also exports it as MLFLOW_TRACKING_URI, which would then choose the store
        # of every job this process (or a child) parses next: put the environment back.
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        try:
            self.experiment_id = self._experiment(experiment, artifact_location)
        except MlflowException as exc:
            if is_auth_error(exc):
                raise UserError(auth_message(tracking_uri)) from None
            raise
        self.parent_run_id = ""
        self.open_runs: set[str] = set()  # runs started and not yet ended (closed on interrupt)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older owl: say what it is
                self.client.set_experiment_tag(
                    found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            return found.experiment_id
        tags = {
            EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
            "mlflow.note.content": (
                f"owl job `{name}`: one parent run per `owl run`, a child run per step (its "
                "config, cache key, input datasets and statistics); the final model is a "
                f"version of the registered model `{name}`."
            ),
        }
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location, tags=tags
            )
        except MlflowException as exc:  # created meanwhile by a concurrent run
            if is_auth_error(exc):
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    # --- runs -----------------------------------------------------------------------------------

    def start_pipeline(self, job_name: str, execution_id: str, params: dict[str, Any]) -> str:
        tags = {
            f"{TAG}job": job_name,
            f"{TAG}execution_id": execution_id,
            f"{TAG}git_commit": git_commit(),
            f"{TAG}ray_submission_id": os.environ.get("OWL_SUBMISSION_ID", ""),
        }
        run = self.client.create_run(
            self.experiment_id, tags=tags, run_name=f"{job_name}-{execution_id}"
        )
        self.parent_run_id = run.info.run_id
        self._log(self.parent_run_id, params=flatten(params))
        return self.parent_run_id

    def end_pipeline(self, ok: bool, metrics: dict[str, float]) -> None:
        if self.parent_run_id:
            self._log(self.parent_run_id, metrics=metrics)
            self.client.set_terminated(self.parent_run_id, "FINISHED" if ok else "FAILED")

    def end_interrupted(self, step_run_id: str, reason: str) -> None:
        """A stopped or killed execution: the computing step's run and the parent run KILLED,
        with the reason as the `owl.error` tag."""
        runs = [r for r in (step_run_id, self.parent_run_id) if r]
        for run_id in runs:  # the states first: the driver may be killed any moment now
            self.client.set_terminated(run_id, "KILLED")
        for run_id in runs:
            self.client.set_tag(run_id, f"{TAG}error", reason[:PARAM_VALUE_CHARS])

    def _step_tags(self, step: str, key: str, version: str, hit: bool) -> dict[str, str]:
        return {
            "mlflow.parentRunId": self.parent_run_id,
            f"{TAG}step": step,
            f"{TAG}cache_key": key,
            f"{TAG}code_version": version,
            f"{TAG}cache": "hit" if hit else "miss",
            f"{TAG}git_commit": git_commit(),
            f"{TAG}ray_submission_id": os.environ.get("OWL_SUBMISSION_ID", ""),
        }

    def start_step(
        self, step: str, key: str, version: str, config: dict[str, Any], hit: bool
    ) -> str:
        tags = self._step_tags(step, key, version, hit)
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=step)
        self._log(run.info.run_id, params=flatten(config))
        return run.info.run_id

    def log_inputs(self, run_id: str, inputs: dict[str, tuple[str, Path, Manifest]]) -> None:
        """inputs: role -> (upstream step, its directory, its manifest)."""
        datasets = [_dataset_input(role, step, d, m) for role, (step, d, m) in inputs.items()]
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

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
        """A cache hit as a finished child run: the same tags, params, inputs and metrics a
        computed step gets (`owl.cache` = hit, `owl.producer_run_id` = the run that computed the
        output), written in four store calls (run with its tags, one batch of params and metrics,
        the inputs, the end), without curves or artifacts. Returns the run id."""
        tags = self._step_tags(step, key, version, hit=True)
        producer = str(manifest.info.get("mlflow_run_id") or "")
        tags.update(_output_tags(manifest, out_dir, producer))
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=step).info.run_id
        # An output committed without a recorded run (older manifests): this run stands for it.
        self._log(
            run_id,
            params=flatten(config),
            metrics=_output_metrics(manifest),
            tags={} if producer else {f"{TAG}producer_run_id": run_id},
        )
        self.log_inputs(run_id, inputs)
        self._log_pretrained(run_id, manifest)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def finish_step(
        self, run_id: str, manifest: Manifest | None, out_dir: Path, hit: bool, error: str = ""
    ) -> None:
        if manifest is not None:
            self._log_manifest(run_id, manifest, out_dir, hit)
        if error:
            self.client.set_tag(run_id, f"{TAG}error", error[:PARAM_VALUE_CHARS])
        self.client.set_terminated(run_id, "FAILED" if error else "FINISHED")

    def _log_manifest(self, run_id: str, manifest: Manifest, out_dir: Path, hit: bool) -> None:
        producer = str(manifest.info.get("mlflow_run_id") or run_id)
        self._log(
            run_id,
            metrics=_output_metrics(manifest),
            tags=_output_tags(manifest, out_dir, producer),
        )
        self._log_pretrained(run_id, manifest)
        if not hit:  # curves and artifacts stay with the run that computed the output
            self._log_curves(run_id, manifest.curves)
            self.client.log_artifact(run_id, str(out_dir / MANIFEST_NAME))
            for rel in manifest.artifacts:  # kept in their folder: predictions/x, units/x
                if (out_dir / rel).is_file():
                    folder = str(Path(rel).parent)
                    self.client.log_artifact(
                        run_id, str(out_dir / rel), None if folder == "." else folder
                    )

    def _log_pretrained(self, run_id: str, manifest: Manifest) -> None:
        """The pretrained folders a step read (the init step's `info["pretrained"]`: kind ->
        {path, sha256}) as dataset inputs: the end of `owl audit model`'s chain."""
        folders = manifest.info.get("pretrained") or {}
        datasets = [_folder_input(kind, f["path"], f["sha256"]) for kind, f in folders.items()]
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

    def _log_curves(self, run_id: str, curves: dict[str, list[tuple[int, float]]]) -> None:
        now = int(time.time() * 1000)
        points = [
            Metric(name, float(v), now, int(s)) for name, pts in curves.items() for s, v in pts
        ]
        for i in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[i : i + 1000])

    def _log(
        self,
        run_id: str,
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        now = int(time.time() * 1000)
        param_list = [Param(k[:250], v) for k, v in (params or {}).items()]
        metric_list = [Metric(k[:250], v, now, 0) for k, v in (metrics or {}).items()]
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, max(len(param_list), len(metric_list), len(tag_list)), _BATCH):
            self.client.log_batch(
                run_id,
                metrics=metric_list[i : i + _BATCH],
                params=param_list[i : i + _BATCH],
                tags=tag_list[i : i + _BATCH],
            )

    # --- model registry -------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        model_dir: Path,
        run_id: str,
        digest: str,
        tags: dict[str, str],
        alias: str = "current",
    ) -> tuple[str, str]:
        """Register the model in `model_dir` (once per output digest); point `alias` at it."""
        existing = self._version_with_digest(name, digest)
        if existing is None:
            logged = mlflow.create_external_model(
                name=name,
                source_run_id=run_id,
                experiment_id=self.experiment_id,
                tags={f"{TAG}model_dir": str(model_dir), f"{TAG}model_digest": digest},
            )
            version_tags = {**tags, f"{TAG}model_digest": digest, f"{TAG}model_dir": str(model_dir)}
            existing = mlflow.register_model(f"models:/{logged.model_id}", name, tags=version_tags)
            card = model_dir / "README.md"  # the export step's model card
            if card.is_file():
                existing = self.client.update_model_version(
                    name, existing.version, description=card.read_text()[:CARD_CHARS]
                )
        # No alias for a partial run's model; a re-run finds it already there.
        if alias and alias not in (getattr(existing, "aliases", None) or []):
            self.client.set_registered_model_alias(name, alias, existing.version)
        return name, str(existing.version)

    def _version_with_digest(self, name: str, digest: str) -> Any:
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return None
        for version in versions:
            if version.tags.get(f"{TAG}model_digest") == digest:
                return version
        return None


def _dataset_input(role: str, step: str, out_dir: Path, manifest: Manifest) -> DatasetInput:
    with warnings.catch_warnings():  # MLflow registers its local-artifact source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(out_dir))
    dataset = MetaDataset(source=source, name=step, digest=manifest.digest[:DIGEST_CHARS])
    entity = dataset._to_mlflow_entity()
    # The UI shows a dataset's profile: what this output is, in numbers, with its full digest.
    profile = {
        "description": f"output of step {step}, read as {role!r}",
        **{k: int(v) for k, v in _file_counts(manifest).items()},
        "sha256": manifest.digest,
        "cache_key": manifest.key,
    }
    entity = Dataset(
        name=entity.name, digest=entity.digest, source_type=entity.source_type,
        source=entity.source, schema=entity.schema, profile=json.dumps(profile),
    )  # fmt: skip
    tags = {
        "mlflow.data.context": role,
        f"{TAG}sha256": manifest.digest,
        f"{TAG}producer_run_id": str(manifest.info.get("mlflow_run_id", "")),
        f"{TAG}cache_key": manifest.key,
    }
    return DatasetInput(entity, [InputTag(k, v) for k, v in tags.items()])


def _folder_input(kind: str, path: str, sha256: str) -> DatasetInput:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path))
    dataset = MetaDataset(source=source, name=f"pretrained.{kind}", digest=sha256[:DIGEST_CHARS])
    tags = {"mlflow.data.context": f"pretrained.{kind}", f"{TAG}sha256": sha256, f"{TAG}path": path}
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])


def _output_tags(manifest: Manifest, out_dir: Path, producer_run_id: str) -> dict[str, str]:
    tags = {
        f"{TAG}output_digest": manifest.digest,
        f"{TAG}output_dir": str(out_dir),
        f"{TAG}num_files": str(len(manifest.files)),
    }
    if producer_run_id:
        tags[f"{TAG}producer_run_id"] = producer_run_id
    return tags


def _output_metrics(manifest: Manifest) -> dict[str, float]:
    """Statistics, `dropped.<reason>` counts and file/row/token counts of an output."""
    metrics = {k: float(v) for k, v in manifest.stats.items()}
    metrics.update({f"dropped.{k}": float(v) for k, v in manifest.dropped.items()})
    metrics.update(_file_counts(manifest))
    return metrics


def _file_counts(manifest: Manifest) -> dict[str, float]:
    rows = [f.rows for f in manifest.shards()]
    tokens = [f.tokens for f in manifest.files if f.tokens is not None]
    counts = {
        "files": float(len(manifest.files)),
        "shards": float(len(rows)),
        "bytes": float(sum(f.size for f in manifest.files)),
    }
    if rows:
        counts["rows"] = float(sum(rows))
    if tokens:
        counts["tokens"] = float(sum(tokens))
    return counts
