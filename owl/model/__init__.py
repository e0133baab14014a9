"""mPLUG-Owl / mPLUG-Owl2 in plain PyTorch: build by name, load, save, logits, generate.

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
    from owl.model.registry import get_config, list_configs
    from owl.model.summary import summarize
    from owl.model.weights import build_model, load_model, save_model

_LAZY = {
    "OwlConfig": "owl.model.config",
    "OwlModel": "owl.model.model",
    "get_config": "owl.model.registry",
    "list_configs": "owl.model.registry",
    "summarize": "owl.model.summary",
    "build_model": "owl.model.weights",
    "load_model": "owl.model.weights",
    "save_model": "owl.model.weights",
}

__all__ = [
    "OwlConfig",
    "OwlModel",
    "build_model",
    "get_config",
    "list_configs",
    "load_model",
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
