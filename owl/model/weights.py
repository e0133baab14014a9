"""Our weights folder format: save, load, and the plumbing under every way to get a model
(`meta_model`: the structure without weights; `model_from_state_dict`: an exact state dict
assigned into it). The ways themselves are listed in owl/model/__init__.py.

Our format: `config.json` (OwlConfig.to_dict()) + `model.safetensors`, or numbered shards plus
`model.safetensors.index.json` when the weights exceed 2 GB. External layouts come in through
explicit name maps (owl.model.hf_import: Hugging Face CLIP vision + LLaMA; owl.model.releases:
the authors' releases; owl.model.pretrained: a job's starting model from them); any key left
missing or unexpected is an error that lists it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from owl.model.config import OwlConfig
from owl.model.model import OwlModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3


def meta_model(cfg: OwlConfig) -> OwlModel:
    """The model's structure on the meta device, no init math run (`_SkipInit`): for shapes,
    parameter counts and memory plans, or to assign weights into (`model_from_state_dict`). Building with init makes torch import
    torch._dynamo (BENCHMARKS.md, "Numbers moved out of the code")."""
    with torch.device("meta"), _SkipInit():
        return OwlModel(cfg)


# ---------------------------------------------------------------------------- our own folder format


def _tied_keys(model: OwlModel) -> set[str]:
    return {"decoder.lm_head.weight"} if model.cfg.decoder.tie_embeddings else set()


def save_model(model: OwlModel, directory: str | Path) -> Path:
    """Write config.json + safetensors (sharded with an index past 2 GB) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    tied = _tied_keys(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    return write_safetensors(state, directory)


def write_safetensors(state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """`model.safetensors`, or numbered shards + `model.safetensors.index.json` past 2 GB (the
    Hugging Face convention)."""

    def save(shard: dict[str, torch.Tensor], path: Path) -> None:
        save_file(shard, str(path), metadata={"format": "pt"})

    return _write_shards(state, Path(directory), save, "model", "safetensors", INDEX_FILE)


def write_pytorch_bin(state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """`pytorch_model.bin`, or numbered shards + `pytorch_model.bin.index.json` past 2 GB: what
    transformers reads without the safetensors package (torch.save of plain tensors)."""

    def save(shard: dict[str, torch.Tensor], path: Path) -> None:
        torch.save(shard, path)

    return _write_shards(
        state, Path(directory), save, "pytorch_model", "bin", "pytorch_model.bin.index.json"
    )


def _write_shards(
    state: dict[str, torch.Tensor],
    directory: Path,
    save: Callable[[dict[str, torch.Tensor], Path], None],
    stem: str,
    ext: str,
    index_name: str,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _split_shards(state, MAX_SHARD_BYTES)
    if len(shards) == 1:
        save(shards[0], directory / f"{stem}.{ext}")
        return directory
    weight_map = {}
    for idx, shard in enumerate(shards, start=1):
        name = f"{stem}-{idx:05d}-of-{len(shards):05d}.{ext}"
        save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def read_safetensors_folder(directory: Path, single: str, index: str) -> dict[str, torch.Tensor]:
    """Tensors of a folder holding `single` or shards listed in the `index` json."""
    if (directory / single).exists():
        return load_file(str(directory / single))
    if (directory / index).exists():
        weight_map = json.loads((directory / index).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / name)))
        return state
    raise ValueError(f"{directory}: neither {single} nor {index} found")


def read_model_config(directory: str | Path) -> OwlConfig:
    """The OwlConfig of a folder written by `save_model` (its config.json), weights not read."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise ValueError(f"{directory}: no {CONFIG_FILE}; is this a folder written by save_model?")
    return OwlConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    adapter: bool = True,
) -> OwlModel:
    """Load a folder written by `save_model`. No random init: built on meta, weights assigned.

    A LoRA stage's folder exported with `lora.merge: false` holds the base weights and the
    adapter apart (`owl.model.lora.LORA_STATE`): the adapter is merged in memory, so the model
    returned is the trained one; `adapter=False` returns the base weights as stored."""
    directory = Path(directory)
    cfg = read_model_config(directory)
    state = read_safetensors_folder(directory, WEIGHTS_FILE, INDEX_FILE)
    lora = None
    if adapter:
        from owl.model.lora import unmerged_adapter

        lora = unmerged_adapter(directory)
    if lora is None:
        return model_from_state_dict(cfg, state, device=device, dtype=dtype, source=str(directory))
    from owl.model.lora import merge_saved_adapter

    model = merge_saved_adapter(model_from_state_dict(cfg, state, source=str(directory)), lora)
    model = model.to(device=device)
    return model.to(dtype=dtype) if dtype is not None else model


def model_from_state_dict(
    cfg: OwlConfig,
    state: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "state dict",
) -> OwlModel:
    """Build on the meta device and assign `state` (which must match exactly)."""
    model = meta_model(cfg)
    check_keys(set(model.state_dict()) - _tied_keys(model), set(state), source)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches: one line naming the tensors
        raise ValueError(f"{source}: {' '.join(str(exc).split())[:1000]}") from exc
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.abstractor.reset_positions(device="cpu")
    model = model.to(device=device)
    return model.to(dtype=dtype) if dtype is not None else model


class _SkipInit(TorchFunctionMode):
    """torch.nn.init functions return their tensor untouched: the weights are assigned next.

    On the meta device they compute nothing anyway, but some (normal_) run torch's Python
    reference kernels, whose first use imports torch._dynamo: seconds in every fresh process (an
    evaluation actor, a serving replica; BENCHMARKS.md, "Numbers moved out of the code")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def check_keys(expected: set[str], got: set[str], source: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model; missing keys {missing}; "
            f"unexpected keys {unexpected}"
        )
