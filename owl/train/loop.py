"""The per-worker training loop: build the model, select what trains, DeepSpeed, train, checkpoint.

Everything comes in through `WorkerJob` and a `Session` (owl.train.job: how this worker reports
metrics and checkpoints and finds the one to restore); no globals. The model and the engine come
from owl.train.engine, the exported model folders from owl.train.export. The Ray Train
implementation of `Session` lives in `pipelines/steps/_ray_train.py`, so this module imports
neither Ray nor (at import time) DeepSpeed.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from owl.data.loader import ShardLoader
from owl.data.step_stream import StepStream
from owl.data.streaming import StreamingLoader
from owl.train import checkpoint
from owl.train.checkpoint import TrainState
from owl.train.config import TrainConfig
from owl.train.deepspeed_cpu import skip_shm_comm
from owl.train.engine import (
    engine_summary,
    held_parameter_elements,
    initialize_engine,
    starting_model,
)
from owl.train.export import EXPORT_DIR, export_for_evaluation, export_model
from owl.train.job import FAULT_ENV, Fault, Session, WorkerJob
from owl.train.loss import num_supervised, token_loss_sum
from owl.train.metrics import WINDOW_COUNTS, Window, attention_pairs, train_flops
from owl.train.stages import format_table, select_for_stage

CURVES = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s")


# When this worker got ready, in seconds since the epoch (time.time()), sent with its first
# report: after a worker failure the driver splits the recovery time by them
# (pipelines/steps/_train_failures.py).
STARTUP_TIMES = ("worker_start", "engine_ready", "restored")


def run_training(job: WorkerJob, session: Session) -> TrainState:
    """Train one stage to its last step, reporting metrics and checkpoints through `session`
    (the first report also carries the `STARTUP_TIMES`)."""
    startup = {"worker_start": time.time()}
    skip_shm_comm()  # a C++ op training never uses (owl/train/deepspeed_cpu.py)
    cfg = job.train
    _seed_everything(cfg.seed)
    model = starting_model(job, session)
    held = held_parameter_elements(model)
    table = select_for_stage(model, job.model.variant, cfg)
    if session.rank == 0:
        print(
            f"trainable parameters (stage {cfg.stage}, {job.model.variant}):\n{format_table(table)}"
        )
    loader = job.data.stream(session.rank, session.world_size)
    total_steps = total_optimizer_steps(cfg, loader)
    engine = initialize_engine(model, cfg, total_steps, session.world_size)
    startup["engine_ready"] = time.time()
    state = TrainState()
    with session.restore_dir() as directory:
        if directory is not None:
            state, loader_states = checkpoint.load(
                engine, directory, rank=session.rank, world_size=session.world_size
            )
            loader.load_state_dict(loader_states)
            state.resumed_from_step = state.step
    startup["restored"] = time.time()
    state.parameters_held = held
    state.engine = engine_summary(engine)
    _train(
        engine, loader, job, session, state, total_steps, started_fresh=state.step == 0,
        startup=startup,
    )  # fmt: skip
    return state


def total_optimizer_steps(
    cfg: TrainConfig, loader: ShardLoader | StreamingLoader | StepStream
) -> int:
    schedule, grad_accum = cfg.schedule, cfg.batch.grad_accum
    if schedule.max_steps > 0:
        return schedule.max_steps
    micro_batches = sum(loader.batches_per_epoch(e) for e in range(schedule.epochs))
    steps = micro_batches // grad_accum
    if steps == 0:
        raise ValueError(
            f"{schedule.epochs} epoch(s) give {micro_batches} micro-batches per stream, fewer "
            f"than batch.grad_accum={grad_accum}: use more data or set schedule.max_steps"
        )
    return steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], engine: Any) -> dict[str, Any]:
    device = engine.device
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if out.get("images") is not None:
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        out["images"] = out["images"].to(dtype)
    return out


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _train_step(
    engine: Any, stream: StepStream, job: WorkerJob, world_size: int
) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches of it; local (this rank's) counts."""
    batches = stream.next_step()
    counts = [num_supervised(b["labels"], b["segment_ids"]) for b in batches]
    (global_count,) = _all_reduce_sum([sum(counts)], engine.device)
    # DeepSpeed divides by its accumulation steps and averages over ranks; undo both so the
    # update is the mean over the supervised tokens of the global batch.
    scale = stream.per_worker * world_size / max(global_count, 1.0)
    loss_sum, tokens, images, pairs = 0.0, 0, 0, 0
    # A worker with one micro-batch fewer than the others (workers do not divide the step's
    # micro-batches) runs its last one again with weight 0: every rank steps alike.
    weights = [scale] * len(batches) + [0.0] * stream.padding
    for i, weight in enumerate(weights):
        batch = batches[min(i, len(batches) - 1)]
        tensors = _to_device(batch, engine)
        logits = engine(
            tensors["input_ids"],
            tensors.get("images"),
            position_ids=tensors["position_ids"],
            segment_ids=tensors["segment_ids"],
        )  # (B, T, V)
        loss = token_loss_sum(logits, tensors["labels"], tensors["segment_ids"])
        engine.backward(loss * weight)
        engine.step()
        if i >= len(batches):
            continue
        loss_sum += float(loss.detach())
        tokens += int((batch["segment_ids"] > 0).sum())
        images += 0 if batch["images"] is None else batch["images"].shape[0]
        pairs += attention_pairs(batch["segment_ids"])
    flops = train_flops(job.model, tokens=tokens, attention_pairs=pairs, images=images)
    samples = sum(b["num_samples"] for b in batches)
    return {
        "loss_sum": loss_sum,
        "supervised": sum(counts),
        "tokens": tokens,
        "samples": samples,
        "flops": flops,
        "images": images,
        "attention_pairs": pairs,
    }


def _maybe_fail(fault: Fault | None, step: int, rank: int, started_fresh: bool) -> None:
    """Fault injection for tests (see FAULT_ENV)."""
    if fault is None or (fault.step, fault.rank) != (step, rank) or not started_fresh:
        return
    if fault.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at step {step} on rank {rank} ({FAULT_ENV})")


def _train(
    engine: Any,
    loader: StepStream,
    job: WorkerJob,
    session: Session,
    state: TrainState,
    total_steps: int,
    *,
    started_fresh: bool,
    startup: dict[str, float] | None = None,
) -> None:
    cfg = job.train
    engine.train()
    window = Window.resumed(state.window, session.rank)
    unsent = dict(startup or {})  # goes out with this run's first report
    while state.step < total_steps:
        counts = _train_step(engine, loader, job, session.world_size)
        state.step += 1
        window.steps += 1
        for key in ("loss_sum", "supervised", "tokens", "samples", "flops"):
            setattr(window, key, getattr(window, key) + counts[key])
        _maybe_fail(job.fault, state.step, session.rank, started_fresh)
        last = state.step == total_steps
        metrics = None
        if state.step % cfg.log_every == 0 or last:
            metrics = _window_metrics(engine, window, state, session.world_size)
            window = Window()
        checkpointing = state.step % cfg.checkpoint.every == 0 or last
        if metrics is not None or checkpointing:
            metrics, unsent = {**(metrics or {}), **unsent}, {}
        if job.eval_dir and cfg.evaluate.every and state.step % cfg.evaluate.every == 0:
            export_for_evaluation(engine, job, Path(job.eval_dir), state.step, rank=session.rank)
        if checkpointing:
            state.window = _open_window(window, engine.device)
            _save_and_report(engine, loader, job, session, state, metrics or {}, export=last)
        elif metrics is not None:
            session.report(metrics, None)


def _open_window(window: Window, device: torch.device) -> dict[str, float] | None:
    """The open window's counts summed over ranks, its steps and seconds, for a checkpoint between
    log steps (None at a log step). Collective: every rank's window has the same steps."""
    if window.steps == 0:
        return None
    sums = _all_reduce_sum(window.counts(), device)
    saved = dict(zip(WINDOW_COUNTS, sums))
    return saved | {"steps": window.steps, "elapsed_s": time.perf_counter() - window.started}


def _window_metrics(
    engine: Any, window: Window, state: TrainState, world_size: int
) -> dict[str, float]:
    """All-reduce the window's counts, compute rates, append to the curves."""
    sums = _all_reduce_sum(window.counts(), engine.device)
    window.loss_sum, window.supervised, window.tokens, window.samples, window.flops = sums
    window.supervised, window.tokens, window.samples = map(int, sums[1:4])
    metrics = window.rates(world_size)
    grad_norm = engine.get_global_grad_norm()
    metrics.update(step=state.step, lr=engine.get_lr()[0], grad_norm=float(grad_norm or 0.0))
    state.tokens += window.tokens
    state.samples += window.samples
    state.elapsed_s += window.steps * metrics["step_time_s"]
    for name in CURVES:
        state.curves.setdefault(name, []).append((state.step, float(metrics[name])))
    return metrics


def _save_and_report(
    engine: Any,
    loader: StepStream,
    job: WorkerJob,
    session: Session,
    state: TrainState,
    metrics: dict[str, float],
    *,
    export: bool,
) -> None:
    with tempfile.TemporaryDirectory(prefix="owl-ckpt-") as tmp:
        directory = Path(tmp)
        checkpoint.save(
            engine, directory, rank=session.rank, state=state, loader_state=loader.state_dict()
        )
        if export:
            export_model(engine, job, directory / EXPORT_DIR, rank=session.rank)
        session.report({**metrics, "step": state.step}, directory)
