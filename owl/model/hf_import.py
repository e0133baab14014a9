"""Hugging Face CLIP vision + LLaMA folders in: explicit name maps (ours <- theirs, the authors'
releases reuse the LLaMA one) and position interpolation, giving state dicts in our names
(owl.model.pretrained builds the model from them). Any key left missing or unexpected is an
error that lists it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from owl.model.config import OwlConfig
from owl.model.weights import check_keys, read_safetensors_folder


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


def read_hf_config(directory: Path, what: str) -> dict:
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
    hf = read_hf_config(directory, "CLIP")
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
    hf = read_hf_config(directory, "LLaMA")
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
