"""A stage's starting model and its DeepSpeed engine: the model fresh or from a `load_model`
folder (under ZeRO-3 built partitioned and loaded one module at a time), the engine with its
parameter groups and learning-rate schedule, and what the engine runs with, read back from it.
DeepSpeed is imported where it is used.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from owl.model.config import OwlConfig
from owl.train.config import TrainConfig, deepspeed_config, lr_multiplier, warmup_steps
from owl.train.job import Session, WorkerJob
from owl.train.stages import param_groups


def starting_model(job: WorkerJob, session: Session | None = None) -> torch.nn.Module:
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


def initialize_engine(
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
