"""Weights in and out: our folder format, Hugging Face CLIP vision + LLaMA, the authors' releases.

Our format: `config.json` (OwlConfig.to_dict()) + `model.safetensors`, or numbered shards plus
`model.safetensors.index.json` when the weights exceed 2 GB. External layouts come in through
explicit name maps; any key left missing or unexpected is an error that lists it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from owl.model.config import OwlConfig
from owl.model.model import OwlModel
from owl.model.registry import get_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3


def build_model(
    cfg: OwlConfig | str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> OwlModel:
    """A freshly initialised model from a config or a registry name."""
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    with torch.device(device):
        model = OwlModel(cfg)
    return model.to(dtype=dtype) if dtype is not None else model


def meta_model(cfg: OwlConfig) -> OwlModel:
    """The model's structure on the meta device, no init math run (`_SkipInit`): for shapes and
    parameter counts, or to assign weights into. Building with init makes torch import
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

    A LoRA stage's folder exported with `merge_lora: false` holds the base weights and the
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


# ------------------------------------------------------------------- Hugging Face CLIP and LLaMA


def read_hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face model folder: safetensors (single or sharded) or .bin shards."""
    if (directory / "model.safetensors").exists() or (
        directory / "model.safetensors.index.json"
    ).exists():
        return read_safetensors_folder(
            directory, "model.safetensors", "model.safetensors.index.json"
        )
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"{directory}: no model.safetensors(.index.json) or pytorch_model*.bin")
    state: dict[str, torch.Tensor] = {}
    for path in bins:  # weights_only: tensors only, never arbitrary pickled objects
        state.update(torch.load(path, weights_only=True, map_location="cpu"))
    return state


def _check_fields(source: str, pairs: dict[str, tuple[object, object]]) -> None:
    wrong = {name: f"folder {theirs} vs config {ours}" for name, (theirs, ours) in pairs.items()}
    wrong = {k: v for k, v in wrong.items() if pairs[k][0] != pairs[k][1]}
    if wrong:
        raise ValueError(f"{source}: config does not match the OwlConfig: {wrong}")


# Hugging Face CLIP vision encoder layer key -> ours (weights and biases).
CLIP_LAYER = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.o_proj",
}
# Hugging Face LLaMA decoder layer key -> ours (weights only); the authors' releases use it too.
LLAMA_LAYER = {
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def layer_names(
    table: dict[str, str],
    num_layers: int,
    theirs: str,
    ours: str,
    parts: tuple[str, ...] = ("weight",),
) -> dict[str, str]:
    """`{theirs}{i}.{key}.{part}` -> `{ours}{i}.{our key}.{part}` for every layer i < num_layers,
    row of `table` (their key -> our key within a layer) and part ("weight", "bias")."""
    return {
        f"{theirs}{i}.{src}.{part}": f"{ours}{i}.{dst}.{part}"
        for i in range(num_layers)
        for src, dst in table.items()
        for part in parts
    }


def clip_vision_name_map(num_layers: int) -> dict[str, str]:
    """Hugging Face CLIP vision key (without the `vision_model.` prefix) -> our key."""
    names = {
        "embeddings.class_embedding": "vision.class_embedding",
        "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
        "embeddings.position_embedding.weight": "vision.position_embedding",
    }
    parts = ("weight", "bias")
    for part in parts:
        names[f"pre_layrnorm.{part}"] = f"vision.pre_norm.{part}"
        names[f"post_layernorm.{part}"] = f"vision.post_norm.{part}"
    names.update(layer_names(CLIP_LAYER, num_layers, "encoder.layers.", "vision.layers.", parts))
    return names


def llama_name_map(num_layers: int, tie_embeddings: bool) -> dict[str, str]:
    """Hugging Face LLaMA key -> our key (text branch; visual MAM copies are filled separately)."""
    names = {
        "model.embed_tokens.weight": "decoder.embed_tokens.weight",
        "model.norm.weight": "decoder.norm.weight",
    }
    if not tie_embeddings:
        names["lm_head.weight"] = "decoder.lm_head.weight"
    names.update(layer_names(LLAMA_LAYER, num_layers, "model.layers.", "decoder.layers."))
    return names


def _rename(
    state: dict[str, torch.Tensor],
    names: dict[str, str],
    source: str,
    ignore: Callable[[str], bool],
) -> dict[str, torch.Tensor]:
    kept = {k: v for k, v in state.items() if not ignore(k)}
    check_keys(set(names), set(kept), source)
    return {names[k]: v for k, v in kept.items()}


def _read_hf_config(directory: Path, what: str) -> dict:
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such folder (expected a Hugging Face {what} folder)")
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory}: no config.json; expected a Hugging Face {what} folder")
    return json.loads((directory / "config.json").read_text())


def interpolate_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """Learned ViT positions (1 + g*g, W), CLS first, resampled to (1 + grid*grid, W): bicubic over
    the patch grid (align_corners=False, in fp32, as the authors' `get_abs_pos` does), CLS kept.
    The usual way to run a 224-px CLIP at 448 px. Identity when the grids match."""
    source = round((positions.shape[0] - 1) ** 0.5)
    if source * source != positions.shape[0] - 1:
        raise ValueError(f"{positions.shape[0] - 1} patch positions are not a square grid")
    if source == grid:
        return positions
    width = positions.shape[1]
    patches = positions[1:].float().reshape(1, source, source, width).permute(0, 3, 1, 2)
    resized = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid * grid, width).to(positions.dtype)
    return torch.cat([positions[:1], resized], dim=0)  # (1 + grid*grid, W)


def load_clip_vision(cfg: OwlConfig, directory: Path) -> dict[str, torch.Tensor]:
    """Our `vision.*` tensors from a CLIPVisionModel (or full CLIPModel) folder. A checkpoint of
    another resolution (same patch size) has its positions interpolated to the config's grid."""
    hf = _read_hf_config(directory, "CLIP")
    hf = hf.get("vision_config", hf)  # a full CLIPModel nests the vision part
    v = cfg.vision
    _check_fields(
        str(directory),
        {
            "patch_size": (hf.get("patch_size"), v.patch_size),
            "hidden_size": (hf.get("hidden_size"), v.width),
            "num_hidden_layers": (hf.get("num_hidden_layers"), v.num_layers),
            "num_attention_heads": (hf.get("num_attention_heads"), v.num_heads),
            "intermediate_size": (hf.get("intermediate_size"), v.mlp_dim),
            "hidden_act": (hf.get("hidden_act", "quick_gelu"), "quick_gelu"),
        },
    )
    # CLIPVisionModel (transformers 5) saves unprefixed keys; CLIPModel and older CLIPVisionModel
    # folders prefix them with `vision_model.`. Text tower and projections are not ours.
    state = {k.removeprefix("vision_model."): t for k, t in read_hf_state_dict(directory).items()}
    vision_roots = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")

    def not_vision(key: str) -> bool:
        return not key.startswith(vision_roots) or key.endswith("position_ids")

    ours = _rename(state, clip_vision_name_map(v.num_layers), str(directory), not_vision)
    grid = v.image_size // v.patch_size
    ours["vision.position_embedding"] = interpolate_positions(
        ours["vision.position_embedding"], grid
    )
    return ours


def load_llama(cfg: OwlConfig, directory: Path) -> dict[str, torch.Tensor]:
    """Our `decoder.*` tensors from a LlamaForCausalLM folder; MAM copies start as text copies."""
    hf = _read_hf_config(directory, "LLaMA")
    d = cfg.decoder
    rope = hf.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    _check_fields(
        str(directory),
        {
            "vocab_size": (hf.get("vocab_size"), d.vocab_size),
            "hidden_size": (hf.get("hidden_size"), d.hidden),
            "num_hidden_layers": (hf.get("num_hidden_layers"), d.num_layers),
            "num_attention_heads": (hf.get("num_attention_heads"), d.num_heads),
            "num_key_value_heads": (
                hf.get("num_key_value_heads") or hf.get("num_attention_heads"),
                d.num_kv_heads,
            ),
            "intermediate_size": (hf.get("intermediate_size"), d.ffn_dim),
            "rms_norm_eps": (hf.get("rms_norm_eps"), d.rms_norm_eps),
            "rope_theta": (float(rope_theta), float(d.rope_theta)),
            "rope_type": (rope.get("rope_type", "default"), "default"),
            "tie_word_embeddings": (bool(hf.get("tie_word_embeddings", False)), d.tie_embeddings),
            "head_dim": (hf.get("head_dim") or d.head_dim, d.head_dim),
            "attention_bias": (bool(hf.get("attention_bias", False)), False),
            "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        },
    )
    state = read_hf_state_dict(directory)
    names = llama_name_map(d.num_layers, d.tie_embeddings)
    ours = _rename(state, names, str(directory), lambda k: k.endswith("rotary_emb.inv_freq"))
    if d.modality_adaptive:
        ours.update(visual_copies_from_text(ours))
    return ours


def visual_copies_from_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAM visual branch initialised as a copy of the text branch, layer by layer."""
    pattern = re.compile(r"\.(input_norm|post_attn_norm|attn\.k_proj|attn\.v_proj)\.weight$")
    copies = {}
    for key, tensor in state.items():
        match = pattern.search(key)
        if match:
            copies[key.replace(match.group(1), match.group(1) + "_visual")] = tensor.clone()
    return copies


def init_from_hf(
    cfg: OwlConfig,
    clip_vision_dir: str | Path | None = None,
    llama_dir: str | Path | None = None,
) -> OwlModel:
    """A model whose ViT and/or decoder come from Hugging Face folders, the rest (always the
    abstractor) freshly initialised. Built on the meta device: loaded weights are assigned, not
    copied into a random model first, so a 7B model takes its size in memory once."""
    loaded: dict[str, torch.Tensor] = {}
    if clip_vision_dir is not None:
        loaded.update(load_clip_vision(cfg, Path(clip_vision_dir)))
    if llama_dir is not None:
        loaded.update(load_llama(cfg, Path(llama_dir)))
    return model_with_fresh_rest(cfg, loaded)


def model_with_fresh_rest(cfg: OwlConfig, loaded: dict[str, torch.Tensor]) -> OwlModel:
    """`loaded` assigned; every component (vision, abstractor, decoder) with a weight not in it is
    built fresh (from-scratch init) and then gets the loaded weights it has."""
    from owl.model.abstractor import Abstractor
    from owl.model.decoder import Decoder
    from owl.model.model import _init_weights
    from owl.model.vision import VisionEncoder

    model = meta_model(cfg)
    result = model.load_state_dict(loaded, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys  # name maps only emit our keys
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    builders = {
        "vision": lambda: VisionEncoder(cfg.vision, cfg.activation_checkpointing),
        "abstractor": lambda: Abstractor(
            cfg.abstractor, cfg.vision, cfg.decoder.hidden, cfg.activation_checkpointing
        ),
        "decoder": lambda: Decoder(cfg.decoder, cfg.activation_checkpointing),
    }
    for name, build in builders.items():
        module = getattr(model, name)
        if any(p.is_meta for p in module.parameters()):
            kept = {
                k: v
                for k, v in module.state_dict().items()
                if not v.is_meta and f"{name}.{k}" in loaded
            }
            fresh = build()
            fresh.apply(_init_weights)
            fresh.load_state_dict(kept, strict=False)
            setattr(model, name, fresh)
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.abstractor.reset_positions(device="cpu")
    return model


# ------------------------------------------------------------------ the authors' releases


def convert_mplug_owl2(
    src_dir: str | Path, dst_dir: str | Path, base: str = "owl2-llama2-7b"
) -> OwlConfig:
    """The authors' released Owl2 folder -> our folder (see owl.model.releases)."""
    from owl.model.releases import convert_release

    return convert_release(src_dir, dst_dir, "owl2", base)[0]


def convert_mplug_owl(
    src_dir: str | Path, dst_dir: str | Path, base: str = "owl1-llama-7b"
) -> OwlConfig:
    """The authors' released mPLUG-Owl (Owl1) folder -> our folder (see owl.model.releases)."""
    from owl.model.releases import convert_release

    return convert_release(src_dir, dst_dir, "owl1", base)[0]


# ------------------------------------------------------------------ the starting model of a job

PRETRAINED_KINDS = ("clip", "llama", "owl2", "owl1")


def pretrained_model(
    cfg: OwlConfig, folders: dict[str, str], seed: int = 0
) -> tuple[OwlModel, dict[str, object]]:
    """The model a job starts from, given its pretrained folders {clip, llama, owl2, owl1} (empty
    strings are unset): an authors' release (owl2 / owl1) converted as a whole, or CLIP and/or
    LLaMA Hugging Face folders with the rest (always the abstractor) initialised fresh from `seed`.
    In fp32 whatever the folders hold (fp16 LLaMA, a bf16 release): one dtype, the one training
    keeps its master weights in. Returns the model and a description (source, what was loaded,
    position interpolation)."""
    model, info = _pretrained_model(cfg, folders, seed)
    info["source_dtypes"] = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    )
    return model.float(), info


def _pretrained_model(
    cfg: OwlConfig, folders: dict[str, str], seed: int
) -> tuple[OwlModel, dict[str, object]]:
    given = {k: v for k, v in folders.items() if v}
    unknown = sorted(set(given) - set(PRETRAINED_KINDS))
    if unknown:
        raise ValueError(f"model.pretrained: unknown folder kind(s) {unknown}")
    releases = [k for k in ("owl2", "owl1") if k in given]
    if not given:
        raise ValueError(
            "model.pretrained: no folder set; set clip and/or llama (Hugging Face folders) or owl2 "
            "/ owl1 (the authors' release), or remove the init step"
        )
    if releases and len(given) > 1:
        raise ValueError(
            f"model.pretrained: {releases[0]} is a whole model; do not also set "
            f"{sorted(set(given) - {releases[0]})}"
        )
    if releases:
        return _from_release(cfg, releases[0], given[releases[0]])
    torch.manual_seed(seed)
    clip, llama = given.get("clip"), given.get("llama")
    loaded: dict[str, torch.Tensor] = {}
    info: dict[str, object] = {"source": "hf", "fresh": ["abstractor"]}
    if clip:
        vision = load_clip_vision(cfg, Path(clip))
        loaded.update(vision)
        info["vision_grid"] = _clip_grid(Path(clip), cfg)
    else:
        info["fresh"].insert(0, "vision")
    if llama:
        loaded.update(load_llama(cfg, Path(llama)))
    else:
        info["fresh"].append("decoder")
    return model_with_fresh_rest(cfg, loaded), info


def _clip_grid(directory: Path, cfg: OwlConfig) -> str:
    hf = _read_hf_config(directory, "CLIP")
    hf = hf.get("vision_config", hf)
    source = hf["image_size"] // hf["patch_size"]
    target = cfg.vision.image_size // cfg.vision.patch_size
    return f"{source}x{source} -> {target}x{target}"


def _from_release(cfg: OwlConfig, kind: str, folder: str) -> tuple[OwlModel, dict[str, object]]:
    from owl.model.releases import convert_release

    variant = "owl2" if kind == "owl2" else "owl1"
    if cfg.variant != variant:
        raise ValueError(
            f"model.pretrained.{kind}: a {variant} release, but the job's model is {cfg.variant}"
        )
    release_cfg, state = convert_release(folder, None, variant)
    token_ids = ("pad_token_id",)  # the job's tokenizer decides
    wrong = {
        f"model.{section}.{name}": f"release {value} vs job {getattr(getattr(cfg, section), name)}"
        for section in ("vision", "abstractor", "decoder")
        for name, value in release_cfg.to_dict()[section].items()
        if getattr(getattr(cfg, section), name) != value and name not in token_ids
    }
    if wrong:
        raise ValueError(
            f"model.pretrained.{kind} {folder}: the release does not match the job's model config "
            f"{wrong}; set model.name / model.overrides to the release's values"
        )
    return model_from_state_dict(cfg, state, source=folder), {"source": kind, "fresh": []}
