"""Evaluation during training (not a step): a stage with `evaluate.every: N` scores the model of
every N-th step on `evaluate.benchmarks` while its workers keep training.

Rank 0 writes the model of such a step to `evaluations/step-N/model/` (owl.train.export,
`export_for_evaluation`) before that step's checkpoint; a driver thread here finds it, starts
`evaluate.num_workers` Ray actors on it (the `evaluate` step's `EvalWorker`, beside the training
workers, with their own resources), scores each benchmark as the `evaluate` step does (no
blank-image pass, no METEOR) and writes `evaluations/step-N/<benchmark>.json`
atomically, one benchmark at a time. A stage interrupted and run again resumes there: a benchmark
already scored for a step is not asked again, and a step's model folder is removed once every
benchmark has been scored. When training ends the driver finishes what is left; the scores become
the stage's curves `eval.<benchmark>.<metric>` (MLflow metrics at the training step).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from owl.train.config import TrainConfig
from pipelines.cache import write_json_atomic
from pipelines.step import StepContext, StepInput, resolve_path

EVAL_DIR = "evaluations"  # under the stage's folder; not listed in its manifest
CURVE_PREFIX = "eval."


def eval_dir(ctx: StepContext) -> Path:
    return ctx.out_dir / EVAL_DIR


class TrainingEvaluator:
    """Reads the benchmarks and encodes their prompts when built (errors before training starts);
    `start()` runs the watcher thread, `finish()` scores what is left and returns the curves."""

    def __init__(
        self, ctx: StepContext, cfg: TrainConfig, inputs: dict[str, StepInput], poll_s: float = 2.0
    ) -> None:
        from owl.data.tokenizer import load_tokenizer
        from owl.eval.evaluate import load_benchmarks
        from pipelines.steps import _eval_passes as evaluate

        if "tokenizer" not in inputs:
            raise ValueError(f"{ctx.step}.evaluate.every: needs the stage's `tokenizer` input")
        self.ctx, self.root, self.poll_s = ctx, eval_dir(ctx), poll_s
        opts = cfg.evaluate
        # The `evaluate` step's settings for these benchmarks: one code path scores both.
        self.cfg = evaluate.Config(
            benchmarks=list(opts.benchmarks), batch_size=opts.batch_size,
            num_workers=opts.num_workers, cpus_per_worker=opts.cpus_per_worker,
            gpus_per_worker=opts.gpus_per_worker, blank_image_control=False,
            limit=opts.limit or None, caption_meteor=False, vqa_rule=opts.vqa_rule,
            caption_tokenizer=opts.caption_tokenizer,
        )  # fmt: skip
        self.benchmarks = load_benchmarks(
            opts.benchmarks, self.cfg, ctx.out_dir / evaluate.IMPORTED_DIR,
            resolve=lambda path: resolve_path(path, inputs),
        )  # fmt: skip
        self.tokenizer = load_tokenizer(inputs["tokenizer"].dir / evaluate.TOKENIZER_DIR)
        self.encoded = evaluate.encode_all(self.cfg, self.tokenizer, ctx.model, self.benchmarks)
        self.seconds = 0.0  # spent evaluating (model loading, generation, scoring)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._abort = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._watch, name="owl-train-eval", daemon=True)
        self._thread.start()

    def finish(self) -> dict[str, list[tuple[int, float]]]:
        """After training: score every step not scored yet, then the curves of all steps."""
        self.stop()
        if self._error is not None:
            raise self._error
        return read_curves(self.root)

    def stop(self, abort: bool = False) -> None:
        """Let the watcher score what is written and end; with `abort` (training failed) end
        after the benchmark it is scoring: a re-run resumes from there."""
        self._abort = self._abort or abort
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        try:
            while not self._abort:
                pending = self.pending()
                if pending:
                    self.evaluate_step(*pending[0])
                elif self._done.wait(self.poll_s) and not self.pending():
                    return
        except BaseException as exc:  # surfaced by finish() on the driver's thread
            self._error = exc

    def pending(self) -> list[tuple[int, list[str]]]:
        """(step, benchmarks not scored yet) of each written model, oldest step first. A model
        whose benchmarks are all scored (written again by a resumed run) is removed."""
        found = []
        for model_dir in sorted(self.root.glob("step-*/model")):
            missing = [n for n in self.benchmarks if not (model_dir.parent / f"{n}.json").exists()]
            if missing:
                found.append((int(model_dir.parent.name.rpartition("-")[2]), missing))
            else:
                shutil.rmtree(model_dir)
        return found

    def evaluate_step(self, step: int, names: list[str]) -> None:
        """Score `names` on the model of `step`, one file per benchmark; then drop the model."""
        import ray

        from owl.eval.evaluate import evaluate as evaluate_benchmarks
        from pipelines.steps import _eval_passes as evaluate
        from pipelines.steps._eval_passes import metric_names, predict_all

        step_dir = self.root / f"step-{step:08d}"
        started = time.monotonic()
        workers = self._start_workers(step_dir / evaluate.MODEL_DIR)
        quiet = SimpleNamespace(progress=lambda *args: None)  # training owns the progress line

        def predict(passes: list[tuple[str, bool]]) -> list[list[dict[str, Any]]]:
            return predict_all(quiet, self.cfg, workers, self.tokenizer, self.encoded, passes)

        try:
            for name in names:
                if self._abort:
                    return
                (result,) = evaluate_benchmarks(
                    {name: self.benchmarks[name]}, predict, self.cfg, layout=None
                )
                named = metric_names(name, result.records, result.metrics, blank=False)
                write_json_atomic(step_dir / f"{name}.json", {"step": step, "metrics": named})
        finally:
            for worker in workers:
                ray.kill(worker)
        shutil.rmtree(step_dir / evaluate.MODEL_DIR)
        took = time.monotonic() - started
        self.seconds += took
        scores = headline(step_dir).items()
        shown = ", ".join(f"{k} {v:.4g}" for k, v in scores if "_ci95_" not in k)
        print(f"{self.ctx.step}: evaluated step {step} in {took:.1f}s: {shown}", flush=True)

    def _start_workers(self, model_dir: Path) -> list[Any]:
        import ray

        from pipelines.steps._eval_passes import EvalWorker

        cfg = self.cfg
        device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
        actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(EvalWorker)
        threads = max(1, int(cfg.cpus_per_worker))
        return [
            actor.remote(str(model_dir), device, cfg.dtype, threads) for _ in range(cfg.num_workers)
        ]


def headline(step_dir: Path) -> dict[str, float]:
    """The scored metrics of one step (with their 95% interval bounds), without item counts."""
    metrics: dict[str, float] = {}
    for path in sorted(step_dir.glob("*.json")):
        for key, value in json.loads(path.read_text())["metrics"].items():
            if not key.endswith(".count"):
                metrics[key] = float(value)
    return metrics


def read_curves(root: Path) -> dict[str, list[tuple[int, float]]]:
    """`eval.<metric>` -> [(training step, value)] over every scored step, steps ascending."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for step_dir in sorted(root.glob("step-*")):
        step = int(step_dir.name.rpartition("-")[2])
        for key, value in headline(step_dir).items():
            curves.setdefault(CURVE_PREFIX + key, []).append((step, value))
    return curves
