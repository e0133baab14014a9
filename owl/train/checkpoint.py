"""Worker checkpoints: the DeepSpeed engine state plus everything else a resume needs.

Layout of one checkpoint directory (every rank writes its own files into a directory of the same
name; Ray Train merges them):
    ds/<tag>/...               DeepSpeed: model states (rank 0), optimizer partitions (every rank),
                               LR scheduler
    ds/latest                  DeepSpeed's pointer to <tag>
    ds/<tag>-universal/        DeepSpeed's universal checkpoint of <tag>, written when a run with
                               another number of workers resumes from it
    worker-rank<r>.pt          step, RNG states of rank r, curves so far, and the position of
                               each sample stream rank r read (owl.data.step_stream)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DS_DIR = "ds"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    # name -> [(step, value)], kept on every rank (identical: values are all-reduced).
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tokens: int = 0  # non-padding tokens trained on, all ranks
    samples: int = 0
    elapsed_s: float = 0.0
    resumed_from_step: int = 0  # the step of the last checkpoint this run was restored from
    # The log window open at this checkpoint (one between log steps): its counts summed over the
    # ranks, its steps and seconds; None when the checkpoint is at a log step. A run resumed from
    # here logs at the next log step what an uninterrupted run logs there.
    window: dict[str, float] | None = None
    # Parameter elements rank 0 held once the model was built (before DeepSpeed): the whole model
    # under ZeRO-0/1/2, about 1/world_size of it under ZeRO-3 (built partitioned).
    parameters_held: int = 0
    # What DeepSpeed runs, read back from the engine: ZeRO stage, micro-batch, accumulation,
    # and the optimizer's parameter groups (lr, weight decay, element count) as it holds them.
    engine: dict = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, directory: Path, *, rank: int, state: TrainState, loader_state: dict) -> None:
    """Write this rank's share of the checkpoint of `state.step` into `directory`."""
    engine.save_checkpoint(str(directory / DS_DIR), tag=step_dir_name(state.step))
    torch.save(
        {"state": state, "loader": loader_state, "rng": rng_state()},
        directory / f"worker-rank{rank}.pt",
    )


def saved_world_size(directory: Path) -> int:
    """How many workers wrote the checkpoint in `directory` (one worker file each)."""
    return len(list(directory.glob("worker-rank*.pt")))


def load(
    engine: Any, directory: Path, *, rank: int, world_size: int
) -> tuple[TrainState, list[dict]]:
    """Restore engine, RNG and train state; return (state, every worker's loader state).

    A checkpoint saved by another number of workers is loaded through DeepSpeed's universal
    checkpoint (converted once, beside the original: `universal_tag`), which re-partitions the
    ZeRO optimizer state over this run's ranks. Collective: all ranks call it."""
    files = sorted(directory.glob("worker-rank*.pt"))
    if not (directory / "worker-rank0.pt").exists():
        raise ValueError(f"checkpoint {directory} has no worker-rank0.pt: it is incomplete")
    own = directory / f"worker-rank{rank}.pt"
    saved = torch.load(own if own.exists() else files[0], weights_only=False)
    state: TrainState = saved["state"]
    tag = step_dir_name(state.step)
    universal = len(files) != world_size and engine.zero_optimization_stage() > 0
    if universal:
        tag = universal_tag(directory, tag, rank=rank)
        engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
    try:
        path, _ = engine.load_checkpoint(str(directory / DS_DIR), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise ValueError(f"checkpoint {directory}: DeepSpeed found no state for step {state.step}")
    if universal and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine.optimizer, directory / DS_DIR / tag)
    set_rng_state(saved["rng"])
    loaders = [torch.load(f, weights_only=False)["loader"] for f in files]
    return state, loaders


def _repair_zero3_universal_load(zero: Any, universal_dir: Path) -> None:
    """Put right the two things DeepSpeed 0.19.8's ZeRO-3 universal load
    (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`) gets
    wrong; the moments and fp32 master weights it restores are exact (compared element by element
    with the optimizer state an uninterrupted run on the new number of workers saved at that step:
    equal bitwise, debug-tiny, 1 -> 2 workers).

    1. It stores one and the same `step` tensor in the Adam state of every flat fp32 sub-group.
       ZeRO-3 steps its sub-groups one at a time and torch's AdamW increments `step` in place, so
       the shared count advanced once per sub-group per optimizer step: with 2 sub-groups the
       first update after the resume used bias corrections for steps 21 and 22 instead of 21, and
       the losses drifted from there (with repair 2 alone: 1.6e-5 relative at step 22, 2.4e-3 at
       step 40, test_elastic_resume's runs resumed at step 20). Each sub-group gets its own copy
       (all of them step together, so the count is the same).
    2. It gives every parameter group the saved first group's hyper-parameters (so no weight
       decay on the matrices when the first group is the vectors'; with repair 1 alone: 1.7e-4
       relative by step 40): each group gets back its own, from the checkpoint's saved groups
       (the file DeepSpeed read them from; memory-mapped, nothing else of it is read).
    With both, those runs' losses are bitwise the uninterrupted run's.
    """
    for flat in zero.fp32_partitioned_groups_flat:
        adam = zero.optimizer.state[flat]
        if torch.is_tensor(adam.get("step")):
            adam["step"] = adam["step"].clone()
    saved = torch.load(
        universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", mmap=True,
        weights_only=False,
    )["param_groups"]  # fmt: skip
    groups = zero.optimizer.param_groups
    if len(saved) != len(groups):
        raise ValueError(
            f"checkpoint {universal_dir.parent.parent} has {len(saved)} optimizer parameter "
            f"groups and this stage {len(groups)}: resume it with the learning-rate and weight "
            "decay settings it was saved with"
        )
    for group, hyper in zip(groups, saved):
        group.update({key: value for key, value in hyper.items() if key != "params"})


def universal_tag(directory: Path, tag: str, *, rank: int) -> str:
    """The DeepSpeed checkpoint `ds/<tag>` converted to a universal checkpoint `ds/<tag>-universal`
    (rank 0 converts it unless an earlier resume did; the others wait). Collective."""
    import argparse
    import os
    import shutil

    import torch.distributed as dist
    from deepspeed.checkpoint import ds_to_universal

    target = directory / DS_DIR / f"{tag}-universal"
    if rank == 0 and not target.is_dir():
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(directory / DS_DIR / tag), output_folder=str(partial),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True,  # our engine saves no universal_checkpoint_info
        )  # fmt: skip
        ds_to_universal.main(args)
        partial.rename(target)  # complete, or absent
    if dist.is_initialized():
        dist.barrier()
    return target.name


def newest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint directory (`step-N` with rank 0's file) with the largest N under `root`."""
    best: tuple[int, Path] | None = None
    for path in Path(root).glob("**/step-*"):
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "worker-rank0.pt").exists():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, path)
    return best[1] if best else None
