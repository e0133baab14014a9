"""The per-worker training loop: build the model, select what trains, DeepSpeed, train, checkpoint.

Everything comes in through `WorkerJob` and a `Session` (how this worker reports metrics and
checkpoints and finds the one to restore); no globals. The Ray Train implementation of `Session`
lives in `pipelines/steps/_ray_train.py`, so this module imports neither Ray nor (at import time)
DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

from owl.data.loader import ShardLoader, StreamingLoader
from owl.data.step_stream import StepStream
from owl.model.config import OwlConfig
from owl.train import checkpoint
from owl.train.checkpoint import TrainState
from owl.train.config import TrainConfig, deepspeed_config, lr_multiplier, warmup_steps
from owl.train.data_plan import DataPlan
from owl.train.deepspeed_cpu import skip_shm_comm
from owl.train.loss import num_supervised, token_loss_sum
from owl.train.metrics import WINDOW_COUNTS, Window, attention_pairs, train_flops
from owl.train.stages import format_table, param_groups, select_for_stage

EXPORT_DIR = "export"  # in the final checkpoint: the consolidated model folder (rank 0)
CURVES = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s")


# Fault injection, for tests only: OWL_FAULT_INJECTION=STEP:RANK:MODE makes worker rank RANK
# fail at optimizer step STEP of a run that did not start from a checkpoint; MODE `raise` raises,
# `kill` sends SIGKILL to its own process. Read by the driver (`Fault.from_env`), carried to the
# workers in `WorkerJob.fault`.
FAULT_ENV = "OWL_FAULT_INJECTION"


@dataclass(frozen=True)
class Fault:
    step: int
    rank: int = 0
    mode: Literal["raise", "kill"] = "raise"

    @classmethod
    def from_env(cls) -> Fault | None:
        text = os.environ.get(FAULT_ENV, "")
        if not text:
            return None
        step, rank, mode = (text.split(":") + ["", ""])[:3]
        if not (step.isdigit() and rank.isdigit() and mode in ("raise", "kill")):
            raise ValueError(f"{FAULT_ENV}={text!r}: expected STEP:RANK:raise|kill, e.g. 3:1:kill")
        return cls(int(step), int(rank), mode)  # type: ignore[arg-type]


@dataclass
class WorkerJob:
    """What every worker needs, picklable. Paths must be readable from every worker."""

    train: TrainConfig
    model: OwlConfig
    data: DataPlan  # owl.train.data_plan.plan_data: what the stage reads and how
    init_model_dir: str = ""  # a folder `owl.model.load_model` reads; empty = fresh init
    fault: Fault | None = None  # tests only (FAULT_ENV)
    # With `train.evaluate.every`: rank 0 writes the model of every such step to
    # `<eval_dir>/step-N/model` (before that step's checkpoint) for the driver's evaluation.
    eval_dir: str = ""


class Session(Protocol):
    """How the loop talks to its launcher (Ray Train, or a plain process in tests/benchmarks)."""

    rank: int
    world_size: int

    def restore_dir(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint directory to resume from, if any."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Hand metrics (and a checkpoint written by this rank) to the launcher; all ranks call it."""
        ...


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
    model = _build_model(job, session)
    held = held_parameter_elements(model)
    table = select_for_stage(model, job.model.variant, cfg)
    if session.rank == 0:
        print(
            f"trainable parameters (stage {cfg.stage}, {job.model.variant}):\n{format_table(table)}"
        )
    loader = job.data.stream(session.rank, session.world_size)
    total_steps = total_optimizer_steps(cfg, loader)
    engine = _initialize_engine(model, cfg, total_steps, session.world_size)
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


def engine_summary(engine: Any) -> dict[str, Any]:
    """The settings the DeepSpeed engine runs with, read back from it (not from our config)."""
    groups = engine.optimizer.param_groups if engine.optimizer is not None else []
    return {
        "device": str(engine.device),
        "bf16": bool(engine.bfloat16_enabled()),
        "zero_stage": int(engine.zero_optimization_stage()),
        "micro_batch_size": int(engine.train_micro_batch_size_per_gpu()),
        "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
        "train_batch_size": int(engine.train_batch_size()),
        "param_groups": [
            {
                "lr": float(g["lr"]),
                "initial_lr": float(g.get("initial_lr", g["lr"])),
                "weight_decay": float(g["weight_decay"]),
            }
            for g in groups
        ],
    }


def held_parameter_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its shard of each ZeRO-3 partitioned parameter
    (`ds_tensor`), all of any other."""
    return sum(
        int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
        for p in model.parameters()
    )


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


def _build_model(job: WorkerJob, session: Session | None = None) -> torch.nn.Module:
    """The starting model. Under ZeRO-3 it is built partitioned (`deepspeed.zero.Init`): each
    module's parameters are sharded over the ranks as soon as the module exists, and an
    `init_model_dir` is read one module at a time on rank 0 and scattered, so the whole model is
    never held by every rank."""
    from owl.model import OwlModel, load_model

    if job.train.memory.zero_stage == 3:
        return _build_partitioned(job, 0 if session is None else session.rank)
    model_cfg = job.model.replace(
        activation_checkpointing=job.train.memory.activation_checkpointing
    )
    if not job.init_model_dir:
        return OwlModel(model_cfg)
    model = load_model(job.init_model_dir)
    _check_init_variant(job, model.cfg)
    _set_activation_checkpointing(model, job.train.memory.activation_checkpointing)
    return model


def _check_init_variant(job: WorkerJob, cfg: OwlConfig) -> None:
    if cfg.variant != job.model.variant:
        raise ValueError(
            f"init model {job.init_model_dir} is {cfg.variant}, the job trains "
            f"{job.model.variant}: use the same model config for both stages"
        )


def _build_partitioned(job: WorkerJob, rank: int) -> torch.nn.Module:
    import deepspeed

    from owl.model import OwlModel
    from owl.model.weights import read_model_config

    cfg = job.model
    if job.init_model_dir:
        cfg = read_model_config(job.init_model_dir)
        _check_init_variant(job, cfg)
    cfg = cfg.replace(activation_checkpointing=job.train.memory.activation_checkpointing)
    ds_config = deepspeed_config(
        job.train, world_size=1, on_gpu=torch.cuda.is_available(), hidden=cfg.decoder.hidden
    )
    # mem_efficient_linear=False: leave torch.nn.functional.linear alone (our Linear calls it).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = OwlModel(cfg)  # random init runs module by module, gathered (Module.apply)
    if job.init_model_dir:
        load_partitioned(model, Path(job.init_model_dir), rank=rank)
    return model


def load_partitioned(model: torch.nn.Module, directory: Path, *, rank: int) -> None:
    """Copy the weights of a `save_model` folder into a ZeRO-3 partitioned model, one module at a
    time: rank 0 reads each tensor from the safetensors files (lazily), every rank keeps its
    shard. Collective: all ranks call it. The keys must match exactly, as in `load_model`."""
    import deepspeed
    from safetensors import safe_open

    from owl.model.weights import INDEX_FILE, WEIGHTS_FILE, check_keys

    if (directory / WEIGHTS_FILE).exists():
        files = {WEIGHTS_FILE: None}
        with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
            where = dict.fromkeys(f.keys(), WEIGHTS_FILE)
    elif (directory / INDEX_FILE).exists():
        where = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        files = dict.fromkeys(where.values())
    else:
        raise ValueError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")
    seen: set[int] = set()
    expected: list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]] = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:  # tied weights: the first owner's name
                seen.add(id(param))
                key = f"{module_name}.{name}" if module_name else name
                expected.append((key, module, name, param))
    check_keys({k for k, *_ in expected}, set(where), str(directory))
    with contextlib.ExitStack() as stack:
        if rank == 0:
            for name in files:
                files[name] = stack.enter_context(safe_open(str(directory / name), "pt"))
        by_module: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        for key, module, _, param in expected:
            by_module.setdefault(id(module), []).append((key, param))
        for entries in by_module.values():
            params = [p for _, p in entries]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        for key, param in entries:
                            param.copy_(files[where[key]].get_tensor(key))


def _set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = enabled


def _initialize_engine(
    model: torch.nn.Module, cfg: TrainConfig, total_steps: int, world_size: int
) -> Any:
    import deepspeed

    on_gpu = torch.cuda.is_available()
    warmup = warmup_steps(cfg, total_steps)

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, warmup=warmup, total=total_steps, min_ratio=cfg.schedule.min_lr_ratio
            ),
        )

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg),
        lr_scheduler=schedule,
        config=deepspeed_config(
            cfg, world_size=world_size, on_gpu=on_gpu, hidden=model.cfg.decoder.hidden
        ),
    )
    return engine


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
            _export(engine, job, directory / EXPORT_DIR, rank=session.rank)
        session.report({**metrics, "step": state.step}, directory)


def export_for_evaluation(engine: Any, job: WorkerJob, root: Path, step: int, *, rank: int) -> None:
    """The model of this step as a `load_model` folder, `root/step-N/model`, written whole or not
    at all (renamed into place), for the evaluation during training; training goes on untouched
    (no random numbers drawn; LoRA adapters are merged into a copy). Collective under ZeRO-3."""
    import shutil

    target = root / checkpoint.step_dir_name(step) / "model"
    if rank == 0 and target.is_dir():  # written before an interruption: the same weights
        return
    partial = target.with_name("model.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _export(engine, job, partial, rank=rank, keep_training=True)
    if rank == 0:
        partial.rename(target)


def _export(
    engine: Any, job: WorkerJob, directory: Path, *, rank: int, keep_training: bool = False
) -> None:
    """Rank 0 writes the consolidated model folder.

    Under ZeRO-3 the weights are gathered module by module onto rank 0 only (DeepSpeed's
    consolidated state dict) and loaded into a copy built on the meta device: no rank but 0 ever
    holds the whole model. With LoRA the adapters go to `adapter/` in peft's format
    (`owl.model.lora.save_adapter`: `peft.PeftModel.from_pretrained` loads it on the stage's
    starting model), and the folder holds the merged weights (`lora.merge`, in place: training is
    over), or with `lora.merge: false` the base weights; `lora.json` says which (`load_model`
    merges an unmerged adapter in memory).
    """
    from owl.model import save_model

    model = _consolidated(engine, job) if engine.zero_optimization_stage() == 3 else engine.module
    if rank != 0:
        return
    if not any("lora_" in n for n, _ in model.named_parameters()):
        save_model(model, directory)
        return
    if keep_training and model is engine.module:  # merging below changes the model in place
        model = _copy_on_cpu(model, job)
    from owl.model.lora import ADAPTER_DIR, merge_lora, save_adapter, unwrap_lora, write_lora_state

    save_adapter(model, directory / ADAPTER_DIR)
    save_model(merge_lora(model) if job.train.lora.merge else unwrap_lora(model), directory)
    write_lora_state(directory, merged=job.train.lora.merge)


def _consolidated(engine: Any, job: WorkerJob) -> torch.nn.Module | None:
    """Rank 0: an unpartitioned copy of the ZeRO-3 model (same modules, LoRA wrappers included);
    other ranks: None. Collective."""
    state = engine._zero3_consolidated_16bit_state_dict()
    if state is None:
        return None
    return _model_from_state(state, engine.module.cfg, job)


def _copy_on_cpu(model: torch.nn.Module, job: WorkerJob) -> torch.nn.Module:
    """A copy of the (LoRA-wrapped) model on the CPU, its tensors copied."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return _model_from_state(state, model.cfg, job)


def _model_from_state(state: dict[str, torch.Tensor], cfg: OwlConfig, job: WorkerJob) -> Any:
    """The stage's model (with its LoRA wrappers when `state` has adapters) holding `state`."""
    from owl.model.weights import meta_model

    model = meta_model(cfg)
    if any("lora_" in k for k in state):
        select_for_stage(model, cfg.variant, job.train)  # the same wrappers and trainable set
    if cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)
    model.load_state_dict(state, strict=not cfg.decoder.tie_embeddings, assign=True)
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.abstractor.reset_positions(device="cpu")
    return model


@dataclass
class LocalSession:
    """A single-process `Session` (world size 1) for benchmarks and debugging: checkpoints are
    copied into `checkpoint_root/step-N`, metrics appended to `reports`."""

    checkpoint_root: Path
    resume_from: Path | None = None
    rank: int = 0
    world_size: int = 1
    reports: list[dict[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import shutil

        self.reports.append(dict(metrics, time=time.time()))
        if checkpoint_dir is not None:
            target = self.checkpoint_root / checkpoint.step_dir_name(int(metrics["step"]))
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)


def init_single_process_group(port: int = 29517, backend: str = "gloo") -> None:
    """A world of one for running the loop outside Ray (DeepSpeed needs a process group): gloo
    on CPU, `backend="nccl"` on a GPU (after `torch.cuda.set_device`)."""
    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group(backend, rank=0, world_size=1)
