"""The pipeline runner: plans a job, reuses committed outputs, computes the rest, records lineage.

For each step of the job, in DAG order:
1. key = cache_key(step, version, config part, model part, upstream manifest digests);
2. a committed output under `<storage>/steps/<step>/<key>/` whose files verify is a cache hit;
3. otherwise take the per-key lock (another `owl run` computing the same key makes us wait and
   then reuse its output), prepare the directory (emptied, or kept for a resumable training step
   so it resumes from its newest checkpoint), run the step with retries and exponential backoff,
   and commit its manifest last.
Each step's execution is recorded under `<storage>/executions/<id>/` and in MLflow (a child run of
the execution's parent run). After the last step the final model is registered in MLflow.

Keys, plans and the checks made before anything starts: pipelines.plan; what lineage is recorded
through: pipelines.sink; the checks on what a step returned: pipelines.step; the Ray cluster:
pipelines.ray_session; the registered model, metrics and MLflow links at the end:
pipelines.registration; `owl status`: pipelines.status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from owl.data.manifest import Manifest
from pipelines import cache, stop_signals
from pipelines.cache import ExecutionRecord, StepRecord
from pipelines.dag import upstream_of
from pipelines.errors import error_summary
from pipelines.jobspec import JobSpec, StepSection
from pipelines.mlflow_links import ui_base
from pipelines.plan import (
    check_environment,
    check_inputs,
    check_memory,
    forced_steps,
    input_files,
    key_parts,
    read_by_computing,
    select_steps,
    step_key,
)
from pipelines.progress import Reporter, StepSummary
from pipelines.ray_session import RaySession
from pipelines.registration import execution_metrics, register_model, where_to_look
from pipelines.sink import LineageSink, mlflow_lineage
from pipelines.step import StepContext, StepInput, check_not_empty, check_output

# Errors that a retry cannot fix: bad configuration or code, not a flaky node or network.
NON_TRANSIENT = (ValueError, TypeError, KeyError, NotImplementedError, ImportError)


class StepFailed(RuntimeError):
    def __init__(self, step: str, error: str):
        super().__init__(f"step {step} failed: {error}")
        self.step = step
        self.error = error


@dataclass
class RunResult:
    execution_id: str
    ok: bool
    steps: list[StepSummary] = field(default_factory=list)
    registered_model: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Runner:
    """Runs one execution of a job (its steps as the job was parsed: `parse_job(raw, table)` takes
    a custom step table). `lineage` is injectable for tests."""

    def __init__(
        self,
        job: JobSpec,
        reporter: Reporter | None = None,
        lineage: LineageSink | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.job = job
        self.reporter = reporter or Reporter()
        self.lineage = lineage
        self.sleep = sleep
        self.execution = ExecutionRecord(cache.new_execution_id(), job.name, "running", time.time())
        self.manifests: dict[str, Manifest] = {}
        self.run_ids: dict[str, str] = {}
        self.files: dict[str, dict[str, str]] = {}  # step -> input file digests in its key
        # Cached steps whose output a computing step reads: their files' sha256 is checked.
        self._read_by_computing: set[str] = set()
        self.ray = RaySession(job.ray_address, lambda: stop_signals.install(self._on_signal))
        self._result: RunResult | None = None
        self._current: StepRecord | None = None  # the step computing now (closed on interrupt)
        self._interrupted = ""
        self._alias = ""  # the alias this run moved to its model ("" if none)

    def run(
        self, force: list[str] | None = None, until: str | None = None, verify: bool = False
    ) -> RunResult:
        names = select_steps(self.job, until)
        forced = forced_steps(self.job, force or [])
        check_memory(self.job, names)  # before anything starts
        check_environment(self.job, names)
        check_inputs(self.job, names)
        self._read_by_computing = read_by_computing(self.job, force, until)
        if self.lineage is None:
            self.lineage = mlflow_lineage(self.job)
        with stop_signals.handled(self._on_signal):
            return self._run(names, forced, verify)

    def _run(self, names: list[str], forced: set[str], verify: bool) -> RunResult:
        self.execution.mlflow_run_id = self.lineage.start_pipeline(
            self.job.name, self.execution.execution_id, self.job.raw
        )
        cache.write_execution_record(self.job.storage, self.execution)
        result = RunResult(
            self.execution.execution_id, ok=False, mlflow_run_id=self.execution.mlflow_run_id
        )
        self._result = result
        try:
            for name in names:
                result.steps.append(self._run_step(name, name in forced, verify))
            result.registered_model, self._alias = register_model(
                self.job, self.lineage, self.execution, self.manifests, self.run_ids
            )
            result.metrics = execution_metrics(self.manifests)
            result.ok = True
        except StepFailed as exc:
            result.error = str(exc)
        except Exception as exc:  # not a step's own failure (lineage store down, a bug): record it
            self._close(result, "failed", _short_error(exc))
            raise
        except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM): record it, then stop
            self.interrupt(_interrupt_reason(exc))
            raise
        finally:
            self.ray.shutdown()
        self._close(result, "done" if result.ok else "failed", result.error)
        links = where_to_look(
            self.job,
            self.lineage,
            self.execution.mlflow_run_id,
            result.registered_model,
            self._alias,
        )
        self.reporter.close(result.steps, result.registered_model, self._alias, links)
        return result

    def _close(self, result: RunResult, state: str, error: str) -> None:
        self.execution.state = state  # type: ignore[assignment]
        self.execution.end = time.time()
        self.execution.error = error
        self.execution.registered_model = result.registered_model
        self.execution.metrics = result.metrics
        cache.write_execution_record(self.job.storage, self.execution)
        self.lineage.end_pipeline(result.ok, result.metrics)

    # --- stop and kill --------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM (`owl stop`, `ray job stop`, `kill`) and SIGINT (Ctrl-C) close the records
        first (the step and the execution as interrupted, their MLflow runs KILLED), then unwind.
        Ray's driver has 3 s (RAY_JOB_STOP_WAIT_TIME_S) before SIGKILL, so nothing slow comes
        first."""
        reason = stop_signals.reason(signum)
        if self._interrupted:  # a second signal while closing: stop now
            raise KeyboardInterrupt(reason)
        self.interrupt(reason)
        raise KeyboardInterrupt(reason)

    def interrupt(self, reason: str) -> None:
        """Record the interruption once: the running step and the execution as `interrupted` with
        `reason` (local files first, they are fast), then their MLflow runs as KILLED."""
        if self._interrupted:
            return
        self._interrupted = reason
        if self._result is None and not self.execution.mlflow_run_id:
            return  # nothing recorded yet
        step_run_id = ""
        if self._current is not None:
            record = self._current
            record.state, record.error = "interrupted", reason
            self._end_record(record)
            step_run_id = record.mlflow_run_id
            self.reporter.finish(record.step, "interrupted", record.duration_s, reason)
            self._current = None
        self.execution.state = "interrupted"
        self.execution.end = time.time()
        self.execution.error = reason
        cache.write_execution_record(self.job.storage, self.execution)
        try:
            self.lineage.end_interrupted(step_run_id, reason)
        except Exception as exc:  # the records above stand; say why MLflow was not updated
            self.reporter.finish("mlflow", "not updated", 0.0, _short_error(exc)[:200])

    # --- one step -------------------------------------------------------------------------------

    def _inputs(self, name: str) -> dict[str, StepInput]:
        return {
            role: StepInput(
                up, cache.step_dir(self.job.storage, up, self.manifests[up].key), self.manifests[up]
            )
            for role, up in upstream_of(self.job.steps[name].spec, self.job.steps).items()
        }

    def _run_step(self, name: str, forced: bool, verify: bool) -> StepSummary:
        inputs = self._inputs(name)
        self.files[name] = input_files(self.job, name)
        digests = {role: i.manifest.digest for role, i in inputs.items()}
        key = step_key(self.job, name, digests, self.files[name])
        out_dir = cache.step_dir(self.job.storage, name, key)
        record = StepRecord(
            self.execution.execution_id, self.job.name, name, key, "running", start=time.time()
        )
        verify = verify or name in self._read_by_computing
        manifest = None if forced else self._find_hit(name, out_dir, verify)
        if manifest is None:
            lock = cache.lock_for(self.job.storage, name, key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                self.reporter.start(name, "waiting: another run is computing this output")
                lock.acquire()
            try:
                self._remove_leftovers(name, out_dir)
                manifest = None if forced else self._find_hit(name, out_dir, verify)
                if manifest is None:
                    # --force starts a resumable step over instead of resuming it, in a folder
                    # beside the old output, which stays until the new one commits.
                    keep = self.job.steps[name].spec.resumable and not forced
                    build_dir = out_dir
                    if forced and out_dir.exists():
                        build_dir = out_dir.with_name(f"{key}.force-{self.execution.execution_id}")
                    manifest = self._compute(name, key, out_dir, inputs, record, keep, build_dir)
            finally:
                lock.release()
        elif cache.forced_builds(out_dir):  # a hit beside what a killed --force run left
            lock = cache.lock_for(self.job.storage, name, key)
            with contextlib.suppress(Timeout), lock.acquire(timeout=0):
                self._remove_leftovers(name, out_dir)
        if record.state != "done":  # a hit, now or after waiting for another run
            self._record_hit(name, key, out_dir, inputs, manifest, record)
        self.manifests[name] = manifest
        self.reporter.finish(name, record.state, record.duration_s, key[:12])
        return StepSummary(name, record.state, record.duration_s, key, dict(manifest.stats))

    def _remove_leftovers(self, name: str, out_dir: Path) -> None:
        """A `--force` run killed mid-way (kill -9, a lost node) leaves its folder beside the
        output; the next run that holds the key's lock removes it, checkpoints and all."""
        for path in cache.remove_forced_builds(out_dir):
            self.reporter.note(f"[owl] {name}: removed {path}, left by an interrupted --force run")

    def _find_hit(self, name: str, out_dir: Path, verify: bool) -> Manifest | None:
        manifest, problems = cache.find_committed(out_dir, full=verify)
        if problems:
            self.reporter.start(
                name, f"cached output fails verification, recomputing: {'; '.join(problems[:3])}"
            )
        return manifest

    def _open_run(self, name: str, key: str, inputs: dict[str, StepInput]) -> str:
        """Start the MLflow child run of a step about to compute, with its inputs; its run id."""
        section = self.job.steps[name]
        run_id = self.lineage.start_step(
            name, key, section.spec.version, self._params(section), hit=False
        )
        self.lineage.log_inputs(run_id, _lineage_inputs(inputs))
        return run_id

    def _record_hit(
        self,
        name: str,
        key: str,
        out_dir: Path,
        inputs: dict[str, StepInput],
        manifest: Manifest,
        record: StepRecord,
    ) -> None:
        section = self.job.steps[name]
        run_id = self.lineage.record_hit(
            name, key, section.spec.version, self._params(section), _lineage_inputs(inputs),
            manifest, out_dir,
        )  # fmt: skip
        self.run_ids[name] = str(manifest.info.get("mlflow_run_id") or run_id)
        record.state, record.mlflow_run_id = "cached", run_id
        self._end_record(record)

    def _compute(
        self,
        name: str,
        key: str,
        out_dir: Path,
        inputs: dict[str, StepInput],
        record: StepRecord,
        keep: bool,
        build_dir: Path,
    ) -> Manifest:
        """Run the step in `build_dir` and commit it as `out_dir` (the same folder, or for a
        forced step one beside it that replaces `out_dir` only once it has committed)."""
        section = self.job.steps[name]
        run_id = self._open_run(name, key, inputs)
        record.mlflow_run_id = run_id
        cache.write_step_record(self.job.storage, record)
        self.reporter.start(name)
        self._current = record
        try:
            manifest = self._attempts(name, section, build_dir, inputs, record, keep)
            manifest.step, manifest.key, manifest.code_version = name, key, section.spec.version
            manifest.created_at = time.time()
            manifest.info["mlflow_run_id"] = run_id
            if self.files[name]:
                manifest.info["input_files"] = dict(self.files[name])
            # Which outputs it was computed from (e.g. `owl chat` finds a model's tokenizer step).
            manifest.info.setdefault(
                "inputs",
                {role: {"step": i.name, "key": i.manifest.key} for role, i in inputs.items()},
            )
            manifest.write(build_dir)  # the commit marker, last
            if build_dir != out_dir:
                cache.swap_in(build_dir, out_dir)
        except BaseException as exc:
            if build_dir != out_dir:
                shutil.rmtree(build_dir, ignore_errors=True)  # the old output stays as it was
            if not isinstance(exc, Exception):  # interrupted: the step's record and run say so
                self.interrupt(_interrupt_reason(exc))
                raise
            self._current = None
            record.state = "failed"
            record.error = _short_error(exc)
            self._end_record(record)
            self.lineage.finish_step(run_id, None, out_dir, hit=False, error=record.error)
            raise StepFailed(name, record.error) from exc
        self._current = None
        self.lineage.finish_step(run_id, manifest, out_dir, hit=False)
        self.run_ids[name] = run_id
        record.state = "done"
        self._end_record(record)
        if isinstance(manifest.info.get("trainable_table"), str):  # once, not once per worker
            self.reporter.note(f"[owl] {name}: parameters\n{manifest.info['trainable_table']}")
        return manifest

    def _attempts(
        self,
        name: str,
        section: StepSection,
        out_dir: Path,
        inputs: dict[str, StepInput],
        record: StepRecord,
        keep: bool,
    ) -> Manifest:
        module = section.spec.load_module()
        policy = section.retries
        for attempt in range(policy.max_retries + 1):
            record.attempts = attempt + 1
            cache.write_step_record(self.job.storage, record)
            cache.prepare_dir(out_dir, keep=keep)
            try:
                if section.spec.uses_ray:
                    self.ray.ensure()
                manifest = module.run(
                    self._context(name, section, out_dir, attempt), section.config, inputs
                )
                check_output(name, manifest, out_dir)
                if not section.allow_empty:
                    check_not_empty(name, manifest)
                return manifest
            except NON_TRANSIENT:
                raise
            except Exception as exc:
                if attempt == policy.max_retries:
                    raise
                wait = policy.backoff_s * 2**attempt
                self.reporter.start(
                    name, f"attempt {attempt + 1} failed ({error_summary(exc)}); retry in {wait:g}s"
                )
                self.sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    def _context(self, name: str, section: StepSection, out_dir: Path, attempt: int) -> StepContext:
        return StepContext(
            step=name,
            out_dir=out_dir,
            job_name=self.job.name,
            model=self.job.owl_config,
            resources=section.resources,
            seed=self.job.seed,
            progress=lambda done, total, msg: self.reporter.update(name, done, total, msg),
            extra={
                "pretrained": dataclasses.asdict(self.job.model.pretrained),
                "storage": str(self.job.storage),
                "attempt": attempt,
                "execution_id": self.execution.execution_id,
                # The model card links each step's run id to the MLflow UI.
                "mlflow_ui": ui_base(self.job.mlflow_uri),
                "mlflow_experiment_id": str(getattr(self.lineage, "experiment_id", "") or ""),
                # A retry may follow a lost node: wait for the cluster's resources to come back.
                "resource_wait_s": section.retries.resource_wait_s if attempt else 0.0,
            },
        )

    def _params(self, section: StepSection) -> dict[str, Any]:
        config, model = key_parts(self.job, section.spec, section)
        params = {
            "config": cache.plain(config),
            "resources": dataclasses.asdict(section.resources),
        }
        if model:
            params["model"] = cache.plain(model)
        if self.files.get(section.spec.name):
            params["input_files"] = dict(self.files[section.spec.name])
        return params

    def _end_record(self, record: StepRecord) -> None:
        record.end = time.time()
        record.duration_s = record.end - record.start
        cache.write_step_record(self.job.storage, record)


def _lineage_inputs(inputs: dict[str, StepInput]) -> dict[str, tuple[str, Path, Manifest]]:
    return {role: (i.name, i.dir, i.manifest) for role, i in inputs.items()}


def _interrupt_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT: Ctrl-C"
    return _short_error(exc)


def _short_error(exc: BaseException) -> str:
    """What a step's record, its MLflow run and the failure line say: the cause first."""
    return error_summary(exc, limit=2000)
