"""The model a stage writes: the consolidated `load_model` folder rank 0 exports into the final
checkpoint (`EXPORT_DIR`) and, during training, into the folder the evaluation reads; with LoRA
the adapter beside the merged (or base) weights. Under ZeRO-3 the weights are gathered onto rank 0
only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from owl.model.config import OwlConfig
from owl.train import checkpoint
from owl.train.job import WorkerJob
from owl.train.stages import select_for_stage

EXPORT_DIR = "export"  # in the final checkpoint: the consolidated model folder (rank 0)


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
    export_model(engine, job, partial, rank=rank, keep_training=True)
    if rank == 0:
        partial.rename(target)


def export_model(
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
