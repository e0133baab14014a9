"""Worker checkpoints: the DeepSpeed engine state plus everything else a resume needs.

Layout of one checkpoint directory (every rank writes its own files into a directory of the same
name; Ray Train merges them):
    ds/<tag>/...               DeepSpeed: model states (rank 0), optimizer partitions (every rank),
                               LR scheduler
    ds/latest                  DeepSpeed's pointer to <tag>
    worker-rank<r>.pt          step, loader position, RNG states of rank r, curves so far
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


def load(engine: Any, directory: Path, *, rank: int) -> tuple[TrainState, dict]:
    """Restore engine, RNG and train state; return (state, loader state) for the caller's loader."""
    worker_file = directory / f"worker-rank{rank}.pt"
    if not worker_file.exists():
        raise ValueError(
            f"checkpoint {directory} has no {worker_file.name}: it was written by fewer workers; "
            "resume with the same num_workers"
        )
    saved = torch.load(worker_file, weights_only=False)
    state: TrainState = saved["state"]
    path, _ = engine.load_checkpoint(str(directory / DS_DIR), tag=step_dir_name(state.step))
    if path is None:
        raise ValueError(f"checkpoint {directory}: DeepSpeed found no state for step {state.step}")
    set_rng_state(saved["rng"])
    return state, saved["loader"]


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
