"""mPLUG-Owl / mPLUG-Owl2 in plain PyTorch: build by name, load, save, logits, generate.

Three ways to get a model, one per source of its weights:
- `OwlModel(get_config("demo"))`: fresh weights (the from-scratch init); build it under
  `with torch.device(...)` to place it, `.to(dtype)` to cast it.
- `load_model(folder)`: a folder of ours (`save_model` writes it: a trained stage, an export, a
  converted release), on a device and in a dtype if asked.
- `pretrained_model(cfg, {"clip": ..., "llama": ...})` (or `{"owl2": release_folder}`): others'
  weights, Hugging Face CLIP / LLaMA folders with the rest fresh, or an authors' release; what a
  job's init step starts from.
The rest are the plumbing under these (owl.model.weights `meta_model`: shapes only, for counts
and memory plans; `model_from_state_dict`: an exact state dict assigned), not entry points.

The names below are imported on first use (PEP 562), so `owl.model.config` and the registry can
be read without importing torch: a job file is validated, and a fully cached `owl run` finishes,
without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from owl.model.config import OwlConfig
    from owl.model.model import OwlModel
    from owl.model.pretrained import pretrained_model
    from owl.model.registry import get_config, list_configs
    from owl.model.summary import summarize
    from owl.model.weights import load_model, save_model

_LAZY = {
    "OwlConfig": "owl.model.config",
    "OwlModel": "owl.model.model",
    "get_config": "owl.model.registry",
    "list_configs": "owl.model.registry",
    "summarize": "owl.model.summary",
    "load_model": "owl.model.weights",
    "pretrained_model": "owl.model.pretrained",
    "save_model": "owl.model.weights",
}

__all__ = [
    "OwlConfig",
    "OwlModel",
    "get_config",
    "list_configs",
    "load_model",
    "pretrained_model",
    "save_model",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
