"""The `stage1` / `stage2` steps: one training stage on Ray Train (V2 API) + DeepSpeed.

Roles: stage1 {"data": tokenize_captions, "tokenizer", "init": the init step (optional)}; stage2
{"data": tokenize_instructions, "init": stage1, "tokenizer"}. Writes `model/` (an
`owl.model.load_model` folder) and keeps Ray Train checkpoints under `checkpoints/`: a re-run of
the same step key resumes from the newest one. This module turns the inputs into the workers'
job and the final checkpoint into the stage's manifest (with its loss plot); the Ray Train side
(session, trainer, progress) is `_ray_train.py`.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from owl.data.manifest import Manifest
from owl.train.config import TrainConfig, mixture_weights
from pipelines.dag import MIX_ROLE
from pipelines.step import StepContext, StepInput, resolve_path
from pipelines.steps._ray_train import (
    build_trainer,
    check_resources,
    events_path,
    training_progress,
    worker_value_error,
)
from pipelines.steps._train_failures import read_events, summarize

# Ray Train, torch, DeepSpeed and the training loop are imported where a stage runs: validating a
# job file or a fully cached `owl run` reads `Config` only (tests/unit/test_cached_rerun.py).
Config = TrainConfig
# What to do when the cluster offers fewer workers is not part of the cache key: a stage started
# with `wait` resumes its checkpoints under `--set stageN.resources.fewer_workers=continue`.
NOT_IN_KEY = ("resources.fewer_workers", "resources.min_workers")
# Evaluation during training adds curves to the stage's output, never changes its model: in the
# key only when set, so the keys of stages that do not evaluate stay put.
KEY_WHEN_SET = ("evaluate",)

LOSS_PLOT = "loss_curve.png"


def _init_model_dir(cfg: TrainConfig, inputs: dict[str, StepInput]) -> str:
    if cfg.stage == 2:
        if "init" not in inputs:
            raise ValueError("train: stage 2 needs an `init` input (the stage-1 step)")
        return str(inputs["init"].dir / "model")
    if "init" in inputs:  # the init step's starting model
        if cfg.init_model:
            raise ValueError(
                "stage1.init_model and the init step both give the starting model: remove one"
            )
        return str(inputs["init"].dir / "model")
    return resolve_path(cfg.init_model, inputs) if cfg.init_model else ""


def run(ctx: StepContext, cfg: TrainConfig, inputs: dict[str, StepInput]) -> Manifest:
    if "data" not in inputs:
        raise ValueError("train: needs a `data` input (tokenized shards)")
    from owl.data.loader import shards_from_manifest
    from owl.train.data_plan import plan_data
    from owl.train.job import Fault, WorkerJob
    from owl.train.stages import planned_model

    shards = shards_from_manifest(inputs["data"].manifest, inputs["data"].dir)
    data = plan_data(cfg, ctx.model, shards, mixed_shards(cfg, inputs))
    # Checked once here: "enough data for every worker" before any worker starts. The global
    # loader also checks every digest here and counts its drops; the streaming one reads only the
    # manifest and one shard's index here: the workers check the digests of the shards they open
    # and count the drops (summed in `_finish`).
    driver_loader = data.driver_loader()
    dropped = {} if data.kind == "streaming" else dict(driver_loader.dropped)
    check_resources(cfg, ctx.extra.get("resource_wait_s", 0.0), ctx.progress)
    table = planned_model(ctx.model, cfg)[1]  # the workers' table, on the meta device (no memory)
    job = WorkerJob(
        train=cfg,
        model=ctx.model,
        data=data,
        init_model_dir=_init_model_dir(cfg, inputs),
        fault=Fault.from_env(),
    )
    evaluator = None
    if cfg.evaluate.every:  # reads the benchmarks and encodes the prompts: errors come now
        from pipelines.steps._train_eval import TrainingEvaluator, eval_dir

        evaluator = TrainingEvaluator(ctx, cfg, inputs)
        job.eval_dir = str(eval_dir(ctx))
    resumed = _announce_resume(ctx, cfg)
    started = time.perf_counter()
    try:
        if evaluator is not None:
            evaluator.start()  # scores the models of evaluated steps while training goes on
        with training_progress(ctx, cfg) as callbacks:
            result = build_trainer(ctx, cfg, job, callbacks=callbacks).fit()
    except Exception as exc:
        if evaluator is not None:
            evaluator.stop(abort=True)
        cause = worker_value_error(exc)
        if cause is None:
            raise
        raise ValueError(cause) from exc  # e.g. a worker found a shard that does not match
    trained = time.perf_counter()
    eval_curves = evaluator.finish() if evaluator is not None else {}
    eval_tail_s = time.perf_counter() - trained  # scoring left when training ended
    if result.checkpoint is None:
        raise RuntimeError(f"train: Ray Train finished without a checkpoint ({result.error})")
    names = data.dataset_names()
    manifest = _finish(ctx, cfg, result, table, time.perf_counter() - started, names)
    if names:  # each mixed dataset's step, rows, tokens, shards and digest (the model card's)
        for name, summary in mixed_summaries(cfg, inputs).items():
            manifest.info["mixture"].get(name, {}).update(summary)
    if evaluator is not None:
        manifest.curves.update(eval_curves)
        manifest.stats["eval_during_training_s"] = evaluator.seconds
        manifest.stats["eval_after_training_s"] = eval_tail_s
    manifest.dropped = dropped or manifest.dropped
    # Workers lost and restarted by Ray Train on the way (nothing when none failed).
    failure_stats, failure_info = summarize(read_events(events_path(ctx)))
    manifest.stats.update(failure_stats)
    manifest.info.update(failure_info)
    # Restored from the last step, nothing trains and Ray Train returns that checkpoint, whose
    # state was saved by the run that wrote it (resumed_from_step 0): say where this one began.
    previous = manifest.stats["resumed_from_step"]
    manifest.stats["resumed_from_step"] = float(max(previous, resumed))
    return manifest


def _announce_resume(ctx: StepContext, cfg: TrainConfig) -> int:
    """The step of the checkpoint this run resumes from (0: none), said in the log and progress."""
    from owl.train import checkpoint

    newest = checkpoint.newest_checkpoint(ctx.out_dir / "checkpoints")
    if newest is None:
        return 0
    step = int(newest.name.rpartition("-")[2])
    print(f"{ctx.step}: resuming from step {step} ({newest})", flush=True)
    ctx.progress(step, cfg.schedule.max_steps or None, f"resuming from step {step}")
    return step


def mixed_inputs(cfg: TrainConfig, inputs: dict[str, StepInput]) -> dict[str, StepInput]:
    """Each `cfg.data.mix` dataset by its key ({} without a mix): its step's name, folder and
    manifest. A mix key is a step of the job (`tokenize_captions`: its output, an input of this
    stage under the role `mix:tokenize_captions`), an `@role/...` folder or a tokenize output
    folder."""
    found = {}
    for path in cfg.data.mix:
        step = inputs.get(f"{MIX_ROLE}{path}")  # a step of the job, by name (pipelines/jobspec.py)
        folder = step.dir if step is not None else Path(resolve_path(path, inputs))
        if not (folder / "manifest.json").is_file():
            raise ValueError(
                f"train.data.mix: {path}: no manifest.json there; give a tokenize step's output folder"
            )
        found[path] = StepInput(step.name if step else path, folder, Manifest.read(folder))
    return found


def mixed_shards(cfg: TrainConfig, inputs: dict[str, StepInput]) -> dict[str, list]:
    """The shards of each `cfg.data.mix` dataset, by its key ({} without a mix): what the data
    plan (owl.train.data_plan.plan_data) mixes with the `data` input."""
    from owl.data.loader import shards_from_manifest

    return {
        k: shards_from_manifest(i.manifest, i.dir) for k, i in mixed_inputs(cfg, inputs).items()
    }


def mixed_summaries(cfg: TrainConfig, inputs: dict[str, StepInput]) -> dict[str, dict]:
    """{dataset: {step, rows, tokens, shards, digest}} of a mixing stage's datasets: its `data`
    input and each `cfg.data.mix` entry, read from their manifests ({} without a mix)."""
    if not cfg.data.mix:
        return {}
    found = {"data": inputs["data"], **mixed_inputs(cfg, inputs)}
    return {
        name: {"step": given.name, **given.manifest.data_summary()} for name, given in found.items()
    }


def _finish(
    ctx: StepContext,
    cfg: TrainConfig,
    result: Any,
    table: dict[str, dict[str, int]],
    wall_s: float,
    names: list[str],
) -> Manifest:
    """Copy the exported model out of the final checkpoint and describe the stage (`names`: the
    mixed datasets' names in the loader's order; [] when the stage does not mix)."""
    import torch

    from owl.train import checkpoint
    from owl.train.export import EXPORT_DIR
    from owl.train.stages import format_table

    model_dir = ctx.out_dir / "model"
    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(directory / EXPORT_DIR, model_dir)
        saved = torch.load(directory / "worker-rank0.pt", weights_only=False)
        streams: dict[int, dict] = {}  # each stream's loader state, once (workers may share one)
        for worker_file in sorted(directory.glob("worker-rank*.pt")):
            streams.update(torch.load(worker_file, weights_only=False)["loader"]["streams"])
        dropped: Counter = Counter()  # the streaming loader's counts, every stream's
        drawn: Counter = Counter()  # samples trained on per dataset: every stream's
        for loader_state in streams.values():
            dropped.update(loader_state.get("dropped", {}))
            drawn.update(dict(enumerate(loader_state.get("drawn", []))))
    state: checkpoint.TrainState = saved["state"]
    manifest = Manifest(step=ctx.step)
    manifest.dropped = {k: v for k, v in sorted(dropped.items()) if v}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            manifest.add_file(ctx.out_dir, path.relative_to(ctx.out_dir).as_posix())
    final_loss = state.curves["loss"][-1][1] if state.curves.get("loss") else float("nan")
    manifest.stats = {
        "final_loss": final_loss,
        "steps": float(state.step),
        "tokens": float(state.tokens),
        "samples": float(state.samples),
        "resumed_from_step": float(state.resumed_from_step),
        "parameters_held_rank0": float(state.parameters_held),
        "train_time_s": state.elapsed_s,
        "wall_time_s": wall_s,
    }
    manifest.curves = {k: [tuple(p) for p in v] for k, v in state.curves.items()}
    if manifest.curves.get("loss"):
        plot_curves(ctx.out_dir / LOSS_PLOT, manifest.curves, title=f"{ctx.job_name} {ctx.step}")
        manifest.add_file(ctx.out_dir, LOSS_PLOT)
        manifest.artifacts.append(LOSS_PLOT)
    manifest.info = {
        "trainable_parameters": table,
        "trainable_table": format_table(table),
        "train_config": cfg.to_dict(),
        "stage": cfg.stage,
        "variant": ctx.model.variant,
        "deepspeed": state.engine,
    }
    if names:
        manifest.info["mixture"] = mixture_drawn(cfg, names, drawn)
        for name, entry in manifest.info["mixture"].items():
            manifest.stats[f"drawn.{metric_name(name)}"] = float(entry["drawn"])
    return manifest


def mixture_drawn(cfg: TrainConfig, names: list[str], drawn: Counter) -> dict[str, dict]:
    """{dataset: {weight, drawn}}: each mixed dataset's configured weight and the samples of it
    the stage trained on (summed over the loader streams, exact across resumes)."""
    weights = mixture_weights(cfg.data.mix, cfg.data.data_weight)
    return {name: {"weight": weights[name], "drawn": int(drawn[i])} for i, name in enumerate(names)}


def metric_name(name: str) -> str:
    """A dataset name as MLflow accepts it in a metric key (a mix folder may be `@role/...`)."""
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", name)


def plot_curves(path: Path, curves: dict[str, list[tuple[int, float]]], *, title: str) -> None:
    """Loss (and learning rate, when recorded) against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = zip(*curves["loss"])
    loss_ax.plot(steps, losses, color="tab:blue", label="loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss", color="tab:blue")
    if curves.get("lr"):
        lr_ax = loss_ax.twinx()
        lr_steps, lrs = zip(*curves["lr"])
        lr_ax.plot(lr_steps, lrs, color="tab:orange", alpha=0.6, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    loss_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
