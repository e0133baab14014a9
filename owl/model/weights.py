"""Weights in and out: our folder format, Hugging Face CLIP vision + LLaMA, the authors' Owl2 release.

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
from safetensors.torch import load_file, save_file

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


# ---------------------------------------------------------------------------- our own folder format


def _tied_keys(model: OwlModel) -> set[str]:
    return {"decoder.lm_head.weight"} if model.cfg.decoder.tie_embeddings else set()


def save_model(model: OwlModel, directory: str | Path) -> Path:
    """Write config.json + safetensors (sharded with an index past 2 GB) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    tied = _tied_keys(model)
    state = {
        k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied
    }
    shards = _split_shards(state, MAX_SHARD_BYTES)
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for idx, shard in enumerate(shards, start=1):
        name = f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
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


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> OwlModel:
    """Load a folder written by `save_model`. No random init: built on meta, weights assigned."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise ValueError(f"{directory}: no {CONFIG_FILE}; is this a folder written by save_model?")
    cfg = OwlConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    state = read_safetensors_folder(directory, WEIGHTS_FILE, INDEX_FILE)
    return model_from_state_dict(cfg, state, device=device, dtype=dtype, source=str(directory))


def model_from_state_dict(
    cfg: OwlConfig,
    state: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "state dict",
) -> OwlModel:
    """Build on the meta device and assign `state` (which must match exactly)."""
    with torch.device("meta"):
        model = OwlModel(cfg)
    check_keys(set(model.state_dict()) - _tied_keys(model), set(state), source)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.abstractor.reset_positions(device="cpu")
    model = model.to(device=device)
    return model.to(dtype=dtype) if dtype is not None else model


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


def clip_vision_name_map(num_layers: int) -> dict[str, str]:
    """Hugging Face CLIP vision key (without the `vision_model.` prefix) -> our key."""
    names = {
        "embeddings.class_embedding": "vision.class_embedding",
        "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
        "embeddings.position_embedding.weight": "vision.position_embedding",
    }
    for part in ("weight", "bias"):
        names[f"pre_layrnorm.{part}"] = f"vision.pre_norm.{part}"
        names[f"post_layernorm.{part}"] = f"vision.post_norm.{part}"
        for j in range(num_layers):
            theirs, ours = f"encoder.layers.{j}", f"vision.layers.{j}"
            pairs = {
                "layer_norm1": "norm1",
                "layer_norm2": "norm2",
                "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2",
                "self_attn.q_proj": "attn.q_proj",
                "self_attn.k_proj": "attn.k_proj",
                "self_attn.v_proj": "attn.v_proj",
                "self_attn.out_proj": "attn.o_proj",
            }
            for src, dst in pairs.items():
                names[f"{theirs}.{src}.{part}"] = f"{ours}.{dst}.{part}"
    return names


def llama_name_map(num_layers: int, tie_embeddings: bool) -> dict[str, str]:
    """Hugging Face LLaMA key -> our key (text branch; visual MAM copies are filled separately)."""
    names = {
        "model.embed_tokens.weight": "decoder.embed_tokens.weight",
        "model.norm.weight": "decoder.norm.weight",
    }
    if not tie_embeddings:
        names["lm_head.weight"] = "decoder.lm_head.weight"
    for i in range(num_layers):
        theirs, ours = f"model.layers.{i}", f"decoder.layers.{i}"
        pairs = {
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
        for src, dst in pairs.items():
            names[f"{theirs}.{src}.weight"] = f"{ours}.{dst}.weight"
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


def load_clip_vision(cfg: OwlConfig, directory: Path) -> dict[str, torch.Tensor]:
    """Our `vision.*` tensors from a CLIPVisionModel (or full CLIPModel) folder."""
    hf = json.loads((directory / "config.json").read_text())
    hf = hf.get("vision_config", hf)  # a full CLIPModel nests the vision part
    v = cfg.vision
    _check_fields(
        str(directory),
        {
            "image_size": (hf.get("image_size"), v.image_size),
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

    return _rename(state, clip_vision_name_map(v.num_layers), str(directory), not_vision)


def load_llama(cfg: OwlConfig, directory: Path) -> dict[str, torch.Tensor]:
    """Our `decoder.*` tensors from a LlamaForCausalLM folder; MAM copies start as text copies."""
    hf = json.loads((directory / "config.json").read_text())
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
    """A fresh model whose ViT and/or decoder come from Hugging Face folders (the rest random)."""
    model = OwlModel(cfg)
    loaded: dict[str, torch.Tensor] = {}
    if clip_vision_dir is not None:
        loaded.update(load_clip_vision(cfg, Path(clip_vision_dir)))
    if llama_dir is not None:
        loaded.update(load_llama(cfg, Path(llama_dir)))
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # name maps only emit our keys
    return model


# ------------------------------------------------------------- the authors' released Owl2 layout


def _split_interleaved_qkv(
    tensor: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Their fused qkv output is laid out (heads, 3, head_dim): not chunk(3)."""
    width = tensor.shape[0] // 3
    grouped = tensor.reshape(num_heads, 3, width // num_heads, *tensor.shape[1:])
    q, k, v = (grouped[:, i].reshape(width, *tensor.shape[1:]) for i in range(3))
    return q, k, v


_OWL2_LAYER_RENAMES = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.k_proj.multiway.0.weight": "attn.k_proj.weight",
    "self_attn.k_proj.multiway.1.weight": "attn.k_proj_visual.weight",
    "self_attn.v_proj.multiway.0.weight": "attn.v_proj.weight",
    "self_attn.v_proj.multiway.1.weight": "attn.v_proj_visual.weight",
    "input_layernorm.multiway.0.weight": "input_norm.weight",
    "input_layernorm.multiway.1.weight": "input_norm_visual.weight",
    "post_attention_layernorm.multiway.0.weight": "post_attn_norm.weight",
    "post_attention_layernorm.multiway.1.weight": "post_attn_norm_visual.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_OWL2_VIT_RENAMES = {
    "input_layernorm": "norm1",
    "post_attention_layernorm": "norm2",
    "self_attn.dense": "attn.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_OWL2_ABSTRACTOR_RENAMES = {
    "crossattention.attention.query": "attn.q_proj",
    "crossattention.attention.key": "attn.k_proj",
    "crossattention.attention.value": "attn.v_proj",
    "crossattention.norm1": "norm_q",
    "crossattention.normk": "norm_k",
    "crossattention.output.out_proj": "attn.o_proj",
    "crossattention.output.norm2": "norm2",
    "crossattention.output.mlp.w1": "mlp.w1",
    "crossattention.output.mlp.w2": "mlp.w2",
    "crossattention.output.mlp.w3": "mlp.w3",
    "crossattention.output.mlp.ffn_ln": "mlp.ffn_norm",
}
_OWL2_FIXED = {
    "model.embed_tokens.weight": "decoder.embed_tokens.weight",
    "model.norm.weight": "decoder.norm.weight",
    "lm_head.weight": "decoder.lm_head.weight",
    "model.vision_model.embeddings.patch_embed.weight": "vision.patch_embed.weight",
    "model.vision_model.embeddings.pre_layernorm.weight": "vision.pre_norm.weight",
    "model.vision_model.embeddings.pre_layernorm.bias": "vision.pre_norm.bias",
    "model.vision_model.post_layernorm.weight": "vision.post_norm.weight",
    "model.vision_model.post_layernorm.bias": "vision.post_norm.bias",
    "model.visual_abstractor.visual_fc.weight": "abstractor.proj.weight",
    "model.visual_abstractor.visual_fc.bias": "abstractor.proj.bias",
}


def _convert_owl2_key(
    key: str, tensor: torch.Tensor, vit_heads: int
) -> dict[str, torch.Tensor] | None:
    """Our key(s) for one tensor of the authors' layout; None when the key is not theirs."""
    if key in _OWL2_FIXED:
        return {_OWL2_FIXED[key]: tensor}
    squeezed = {  # their [1, 1, D] / [1, N, D] parameters are plain vectors / matrices in ours
        "model.vision_model.embeddings.cls_token": "vision.class_embedding",
        "model.vision_model.embeddings.position_embedding": "vision.position_embedding",
        "model.visual_abstractor.query_embeds": "abstractor.queries",
        "model.visual_abstractor.vit_eos": "abstractor.end_of_image",
    }
    if key in squeezed:
        return {squeezed[key]: tensor.reshape(-1, tensor.shape[-1]).squeeze(0)}
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
        name = _OWL2_LAYER_RENAMES.get(m.group(2))
        return {f"decoder.layers.{m.group(1)}.{name}": tensor} if name else None
    if m := re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        prefix = f"vision.layers.{m.group(1)}"
        if m.group(2) == "self_attn.query_key_value":
            q, k, v = _split_interleaved_qkv(tensor, vit_heads)
            part = m.group(3)
            return {f"{prefix}.attn.{n}_proj.{part}": t for n, t in zip("qkv", (q, k, v))}
        name = _OWL2_VIT_RENAMES.get(m.group(2))
        return {f"{prefix}.{name}.{m.group(3)}": tensor} if name else None
    if m := re.fullmatch(
        r"model\.visual_abstractor\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key
    ):
        name = _OWL2_ABSTRACTOR_RENAMES.get(m.group(2))
        return {f"abstractor.layers.{m.group(1)}.{name}.{m.group(3)}": tensor} if name else None
    return None


def owl2_config_from_release(
    src: Path, state: dict[str, torch.Tensor], base: OwlConfig
) -> OwlConfig:
    """Sizes from tensor shapes; head counts, eps and rope from their config.json (else `base`)."""
    hf = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    visual = hf.get("visual_config", {})
    vit_hf, abs_hf = visual.get("visual_model", {}), visual.get("visual_abstractor", {})

    def count_layers(prefix: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(prefix + r"\.(\d+)\.", k))}
        return len(found)

    embed = state["model.embed_tokens.weight"]
    num_heads = hf.get("num_attention_heads", base.decoder.num_heads)
    head_dim = embed.shape[1] // num_heads
    kv_width = state["model.layers.0.self_attn.k_proj.multiway.0.weight"].shape[0]
    patch = state["model.vision_model.embeddings.patch_embed.weight"]
    num_positions = state["model.vision_model.embeddings.position_embedding"].shape[-2]
    grid = round((num_positions - 1) ** 0.5)
    rope = hf.get("rope_parameters") or {}
    return base.replace(
        variant="owl2",
        vision={
            "image_size": grid * patch.shape[-1],
            "patch_size": patch.shape[-1],
            "width": patch.shape[0],
            "num_layers": count_layers(r"model\.vision_model\.encoder\.layers"),
            "num_heads": vit_hf.get("num_attention_heads", base.vision.num_heads),
            "mlp_dim": state["model.vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "layer_norm_eps": vit_hf.get("layer_norm_eps", base.vision.layer_norm_eps),
        },
        abstractor={
            "num_queries": state["model.visual_abstractor.query_embeds"].shape[-2],
            "width": state["model.visual_abstractor.query_embeds"].shape[-1],
            "num_layers": count_layers(r"model\.visual_abstractor\.encoder\.layers"),
            "num_heads": abs_hf.get("num_attention_heads", base.abstractor.num_heads),
            "ffn_dim": state[
                "model.visual_abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight"
            ].shape[0],
            "layer_norm_eps": abs_hf.get("layer_norm_eps", base.abstractor.layer_norm_eps),
            "positional_embeddings": True,
        },
        decoder={
            "vocab_size": embed.shape[0],
            "hidden": embed.shape[1],
            "num_layers": count_layers(r"model\.layers"),
            "num_heads": num_heads,
            "num_kv_heads": kv_width // head_dim,
            "ffn_dim": state["model.layers.0.mlp.gate_proj.weight"].shape[0],
            "rms_norm_eps": hf.get("rms_norm_eps", base.decoder.rms_norm_eps),
            "rope_theta": rope.get("rope_theta", hf.get("rope_theta", base.decoder.rope_theta)),
            "max_positions": hf.get("max_position_embeddings", base.decoder.max_positions),
            "modality_adaptive": True,
            "tie_embeddings": False,
        },
    )


def convert_mplug_owl2(
    src_dir: str | Path, dst_dir: str | Path, base: str = "owl2-llama2-7b"
) -> OwlConfig:
    """Convert the authors' released Owl2 folder (.bin shards) into our folder format."""
    src = Path(src_dir)
    state = read_hf_state_dict(src)
    vit_heads = (
        json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    )
    vit_heads = (
        vit_heads.get("visual_config", {})
        .get("visual_model", {})
        .get("num_attention_heads", get_config(base).vision.num_heads)
    )
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        mapped = _convert_owl2_key(key, tensor, vit_heads)
        if mapped is None:
            unknown.append(key)
        else:
            converted.update(mapped)
    if unknown:
        raise ValueError(f"{src}: keys not in the mPLUG-Owl2 release layout: {sorted(unknown)}")
    cfg = owl2_config_from_release(src, state, get_config(base))
    model = model_from_state_dict(cfg, converted, source=str(src))
    save_model(model, dst_dir)
    return cfg
