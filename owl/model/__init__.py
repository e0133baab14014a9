"""mPLUG-Owl / mPLUG-Owl2 in plain PyTorch: build by name, load, save, logits, generate."""

from owl.model.config import OwlConfig
from owl.model.model import OwlModel
from owl.model.registry import get_config, list_configs
from owl.model.summary import summarize
from owl.model.weights import build_model, load_model, save_model

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
