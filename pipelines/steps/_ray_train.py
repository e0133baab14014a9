"""Ray Train for the training step (not a step): the per-worker entry point and its session, the
trainer, the cluster-resources check, the workers' progress relayed to the driver, and a worker's
data error unwrapped from Ray Train's failure.

Ray Train, torch and the training loop are imported where a stage runs (tests/unit/
test_cached_rerun.py: a fully cached `owl run` imports none of them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from owl.train.config import TrainConfig
from pipelines.step import StepContext

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from owl.train.job import WorkerJob

RUN_NAME = "train"
# After a worker failure Ray Train starts the workers again once the cluster has their resources,
# giving up a try after 60 s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S): a bounded wait for a lost
# node's replacement (owl's own retry waits `retry.resource_wait_s`).
RESTART_TRIES = 5


class RaySession:
    """`owl.train.job.Session` on Ray Train: rank info, report, and the checkpoint to restore."""

    def __init__(self, resume_path: str) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._resume_path = resume_path

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        """Ray Train's latest checkpoint (after a worker restart), else the one the driver found
        on disk (after a driver restart), else None."""
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is not None:
            with reported.as_directory() as directory:
                yield Path(directory)
        elif self._resume_path:
            yield Path(self._resume_path)
        else:
            yield None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        from owl.train import checkpoint

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_dir_name=checkpoint.step_dir_name(int(metrics["step"])),
        )


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: everything comes in through `config`."""
    import ray.train
    import torch

    from owl.train.loop import run_training

    if torch.cuda.is_available():
        torch.cuda.set_device(ray.train.get_context().get_local_rank())
    run_training(config["job"], RaySession(config["resume_path"]))


def _shortfall(cfg: TrainConfig) -> tuple[str, str] | None:
    """(resource name, what the job asks for beyond what the cluster has now); None: it fits.
    With `fewer_workers: continue` the job asks for `min_workers`."""
    import ray

    have, res = ray.cluster_resources(), cfg.resources
    workers = res.min_workers if res.fewer_workers == "continue" else res.num_workers
    for name, per_worker in (("CPU", res.cpus_per_worker), ("GPU", res.gpus_per_worker)):
        need = per_worker * workers
        if need > have.get(name, 0.0):
            return name, (
                f"{workers} workers x {per_worker} {name} = {need:g} {name}s, but the Ray "
                f"cluster has {have.get(name, 0.0):g}"
            )
    return None


def check_resources(
    cfg: TrainConfig, wait_s: float = 0.0, progress: Any = None, poll_s: float = 5.0
) -> None:
    """ValueError before anything starts when the job asks for more than the cluster has. With
    `wait_s` (a retry after a failure: a lost node may be coming back) it first waits up to that
    long for the resources, saying so through `progress(done, total, message)`."""
    short = _shortfall(cfg)
    deadline = time.monotonic() + wait_s
    while short and time.monotonic() < deadline:
        if progress is not None:
            left = deadline - time.monotonic()
            progress(0, None, f"waiting for the cluster: {short[1]} (up to {left:.0f}s more)")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        short = _shortfall(cfg)
    if short:
        waited = f" (waited {wait_s:g}s for it)" if wait_s else ""
        raise ValueError(
            f"train: {short[1]}{waited}; lower resources.num_workers or "
            f"resources.{short[0].lower()}s_per_worker, or "
            "add nodes"
        )


def scaling_workers(cfg: TrainConfig) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: the stage's, or with `fewer_workers: continue` the elastic
    range (min_workers, num_workers): Ray Train starts (and after a failure restarts) as many
    workers as the cluster has room for, and grows the group when nodes join."""
    res = cfg.resources
    if res.fewer_workers == "continue" and res.min_workers < res.num_workers:
        return (res.min_workers, res.num_workers)
    return res.num_workers


def build_trainer(
    ctx: StepContext, cfg: TrainConfig, job: WorkerJob, callbacks: list[Any] | None = None
) -> TorchTrainer:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from owl.train import checkpoint

    # Ray Train V2 sends every print of a worker to its logger as well as to the worker's
    # stdout: each line (the trainable-parameter table) reached console.log twice. The value
    # travels from the driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    storage = ctx.out_dir / "checkpoints"
    storage.mkdir(parents=True, exist_ok=True)
    newest = checkpoint.newest_checkpoint(storage)
    cpus, gpus = cfg.resources.cpus_per_worker, cfg.resources.gpus_per_worker
    use_gpu = gpus > 0
    resources = {"CPU": cpus} | ({"GPU": gpus} if use_gpu else {})
    return TorchTrainer(
        _worker,
        train_loop_config={"job": job, "resume_path": str(newest) if newest else ""},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling_workers(cfg), use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(storage),
            failure_config=FailureConfig(
                max_failures=cfg.resources.max_failures, controller_failure_limit=RESTART_TRIES
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks or None,
        ),
    )


def worker_value_error(exc: BaseException) -> str | None:
    """The message of a ValueError a worker raised (a data error, e.g. a corrupted shard the
    streaming loader found on opening it), from Ray Train's WorkerGroupError; else None."""
    for failure in getattr(exc, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)  # RayTaskError wraps the worker's exception
        if isinstance(cause, ValueError):
            return str(cause.args[0]) if cause.args else str(cause)
    return None


def _progress_path(ctx: StepContext) -> Path:
    """Where the Ray Train controller leaves rank 0's latest metrics for the driver to show."""
    if not ctx.extra.get("storage") or not ctx.extra.get("execution_id"):
        return ctx.out_dir / ".progress.json"  # not listed in the manifest: not an output
    execution = Path(ctx.extra["storage"]) / "executions" / ctx.extra["execution_id"]
    return execution / f"progress-{ctx.step}.json"


def _progress_callback(path: Path) -> Any:
    """A Ray Train callback (it runs in the controller, after every report of the workers) that
    writes rank 0's metrics to `path`."""
    from ray.train import UserCallback

    from pipelines.cache import write_json_atomic

    class ProgressFile(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if metrics and metrics[0]:
                write_json_atomic(path, {k: float(v) for k, v in metrics[0].items()})

    return ProgressFile()


def events_path(ctx: StepContext) -> Path:
    """Where the Ray Train controller leaves the workers' failures and recoveries
    (`_train_failures`), beside the progress file."""
    progress = _progress_path(ctx)
    return progress.with_name(progress.name.replace("progress", "events", 1))


@contextlib.contextmanager
def training_progress(
    ctx: StepContext, cfg: TrainConfig, poll_s: float = 1.0
) -> Iterator[list[Any]]:
    """Yield the callbacks for the trainer; meanwhile a driver thread turns what they write into
    `ctx.progress(step, total, "loss ..., tok/s, ETA")` (the metrics the workers report anyway)
    and a line for each failure and recovery of the workers."""
    import json
    import threading

    from pipelines.progress import training_message
    from pipelines.steps import _train_failures

    path, events = _progress_path(ctx), events_path(ctx)
    path.unlink(missing_ok=True)
    events.unlink(missing_ok=True)
    total = cfg.schedule.max_steps if cfg.schedule.max_steps > 0 else None
    done = threading.Event()

    def watch() -> None:
        seen, shown = 0.0, 0
        while True:
            stop = done.wait(poll_s)  # one more look after training ends: its last report
            try:
                mtime = path.stat().st_mtime_ns
                if mtime != seen:
                    metrics = json.loads(path.read_text())
                    seen = mtime
                    ctx.progress(metrics.get("step", 0.0), total, training_message(metrics, total))
            except (OSError, ValueError):
                pass
            shown = _train_failures.show_new(ctx, events, shown, cfg.resources.max_failures)
            if stop:
                return

    ctx.progress(0, total, "starting Ray Train workers")
    thread = threading.Thread(target=watch, name=f"owl-progress-{ctx.step}", daemon=True)
    thread.start()
    try:
        yield [_progress_callback(path), _train_failures.failure_callback(events)]
    finally:
        done.set()
        thread.join(timeout=5)
