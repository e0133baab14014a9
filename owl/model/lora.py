"""LoRA on the decoder attention with peft (Owl1 stage 2: r=8, alpha=32, dropout 0.05, q/v).

Only decoder attention projections get adapters: the ViT and abstractor have modules with the same
short names (q_proj, ...) and stay untouched. After `apply_lora` exactly the LoRA parameters plus
the parameters of `modules_to_save` require grad (the authors' release re-enabled gradients on the
whole LLM after wrapping it; we do not). `modules_to_save` modules are trained in place, not copied.

`save_adapter` writes peft's own adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module>...` as `PeftModel.save_pretrained` writes them): on the model the
adapters were put on (the stage-1 model for Owl1's stage 2), `peft.PeftModel.from_pretrained(base,
folder)` gives the trained model's logits. Modules trained whole next to the adapters (the abstractor
when stage 2 trains it) go in as peft `modules_to_save`.

A model folder with an adapter also holds `lora.json` ({"adapter": "adapter", "merged": bool}):
whether its own weights already have the adapter folded in (`lora.merge: true`, the default) or are
the base weights (`lora.merge: false`). `owl.model.load_model` reads it and, for base weights,
merges the adapter in memory with peft (`merge_saved_adapter`), so evaluation, chat and the
authors'-layout export get the trained model either way.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from owl.model.model import OwlModel

# peft is imported where it is used: it imports transformers (and that torch._dynamo), seconds
# that `load_model` (which only checks for a kept-apart adapter) must not pay in an eval actor.
ADAPTER_DIR = "adapter"  # in an exported model folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_STATE = "lora.json"  # in a model folder that has an adapter: is it merged into the weights?
DECODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "k_proj_visual", "v_proj_visual")


def apply_lora(
    model: OwlModel,
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    modules_to_save: Sequence[str] = (),
) -> OwlModel:
    """Inject LoRA adapters in place into `decoder.layers.*.attn.<target>`; freeze the rest.

    modules_to_save: dotted module names (e.g. "abstractor", "decoder.embed_tokens") that stay
    fully trainable."""
    unknown = sorted(set(target_modules) - set(DECODER_ATTENTION))
    if unknown:
        raise ValueError(
            f"LoRA target_modules {unknown} are not decoder attention projections; "
            f"choose from {DECODER_ATTENTION}"
        )
    module_names = dict(model.named_modules())
    missing = sorted(name for name in modules_to_save if name not in module_names)
    if missing:
        raise ValueError(f"modules_to_save {missing} are not modules of the model")
    targets = "|".join(re.escape(t) for t in target_modules)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # A string is matched in full against each module name: decoder attention only.
        target_modules=rf"decoder\.layers\.\d+\.attn\.({targets})",
        bias="none",
    )
    inject_adapter_in_model(config, model)
    model.train(model.training)  # new dropout modules start in training mode; follow the model
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    for name in modules_to_save:
        for param in module_names[name].parameters():
            param.requires_grad = True
    return model


def merge_lora(model: OwlModel) -> OwlModel:
    """Fold every adapter into its base weight and remove the wrappers: plain OwlModel names."""
    return unwrap_lora(model, merge=True)


def unwrap_lora(model: OwlModel, merge: bool = False) -> OwlModel:
    """Remove the LoRA wrappers (folding the adapters in first when `merge`): plain names."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        if merge:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent: nn.Module = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad = True
    return model


def trained_modules(model: OwlModel) -> list[str]:
    """Top-level modules (vision, abstractor, decoder) with a trainable parameter that is not an
    adapter: what an adapter folder must carry whole (peft `modules_to_save`)."""
    return [
        name
        for name, module in model.named_children()
        if any(p.requires_grad and "lora_" not in n for n, p in module.named_parameters())
    ]


def save_adapter(
    model: OwlModel, directory: str | Path, modules_to_save: Sequence[str] | None = None
) -> Path:
    """The adapters of a LoRA-wrapped model (and `modules_to_save`, default `trained_modules`) as
    a peft adapter folder that `peft.PeftModel.from_pretrained(base, directory)` loads."""
    from peft import get_peft_model_state_dict

    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapter: the model has no LoRA adapters (see apply_lora)")
    modules = list(trained_modules(model) if modules_to_save is None else modules_to_save)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config["default"])
    config.modules_to_save = modules or None
    config.save_pretrained(str(directory))
    prefix = "base_model.model."
    state = {prefix + k: v for k, v in get_peft_model_state_dict(model).items()}
    for name in modules:
        for param_name, param in model.get_submodule(name).named_parameters():
            state[f"{prefix}{name}.{param_name}"] = param
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def write_lora_state(model_dir: str | Path, merged: bool) -> None:
    """Record in a model folder that `adapter/` belongs to it and whether the folder's weights
    already hold it (merged) or are the base weights it applies to."""
    state = {"adapter": ADAPTER_DIR, "merged": merged}
    (Path(model_dir) / LORA_STATE).write_text(json.dumps(state, indent=2) + "\n")


def unmerged_adapter(model_dir: str | Path) -> Path | None:
    """The adapter folder to apply on top of `model_dir`'s weights when they are the base weights
    (`lora.merge: false`); None when there is none or it is already merged."""
    path = Path(model_dir) / LORA_STATE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("merged", True):
        return None
    adapter = Path(model_dir) / state.get("adapter", ADAPTER_DIR)
    if not (adapter / ADAPTER_CONFIG).exists():
        raise ValueError(f"{path} names the adapter {adapter}, which has no {ADAPTER_CONFIG}")
    return adapter


def merge_saved_adapter(model: OwlModel, adapter_dir: str | Path) -> OwlModel:
    """`model` with a peft adapter folder (`save_adapter`) loaded by peft and folded into its
    weights (modules_to_save replaced by the trained copies): a plain OwlModel, the trained one."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = wrapped.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad = True
    return merged
