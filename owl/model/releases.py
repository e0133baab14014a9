"""The authors' released layouts (mPLUG-Owl2 and mPLUG-Owl), in and out, through explicit name maps.

A release folder is what their `save_pretrained` writes: `config.json` (their config classes'
`to_dict()`) and `pytorch_model*.bin` or `model*.safetensors` shards. Besides the parameters, their
checkpoints hold persistent buffers: LLaMA's `self_attn.rotary_emb.inv_freq` in every decoder layer
(both releases, and their own conversion script writes it), and in Owl2 the abstractor's sin-cos
positions `crossattention.attention.q_pos_embed` / `k_pos_embed`. We recompute those from the
config; a saved one is accepted when it equals the recomputed value (to its dtype's precision) and
then dropped, and a mismatch is an error that names it.

Numerics follow their code (read at X-PLUG/mPLUG-Owl, facts only): the ViT LayerNorms use the vision
config's eps (default 1e-6 in both releases); in the abstractor `norm1`, `normk` and `norm2` are
LayerNorms built without an eps (torch's 1e-5) and only the FFN's `ffn_ln` uses the abstractor
config's eps (default 1e-6). The fused ViT qkv is laid out per head, (heads, 3, head_dim).

`to_release` writes the same layout back (buffers included), so a model trained here can be loaded
by their code; `release -> ours -> release` is exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from owl.model.config import OwlConfig
from owl.model.hf_import import LLAMA_LAYER, layer_names, read_hf_state_dict
from owl.model.lora import unmerged_adapter
from owl.model.positions import sincos_1d, sincos_2d_with_cls
from owl.model.registry import get_config
from owl.model.release_files import write_release_files
from owl.model.variants import ModelVariant, ReleaseLayout, get_variant
from owl.model.weights import (
    INDEX_FILE,
    WEIGHTS_FILE,
    load_model,
    model_from_state_dict,
    read_model_config,
    read_safetensors_folder,
    save_model,
    write_pytorch_bin,
    write_safetensors,
)

# Their config classes' defaults, used when a field is absent from a release's config.json.
_VISION_EPS = 1e-6  # MplugOwlVisionConfig.layer_norm_eps, both releases
_ABSTRACTOR_FFN_EPS = 1e-6  # MplugOwlVisualAbstractorConfig.layer_norm_eps, both releases
_ABSTRACTOR_NORM_EPS = (
    1e-5  # nn.LayerNorm(dim) / LayerNormFp32(dim): torch's default, not configurable
)
# The BOS / EOS ids an exported config.json carries: LLaMA's tokenizer's, as in both releases (our
# BPE tokenizer puts them there too); our own code takes them from the tokenizer.
LLAMA_BOS_ID, LLAMA_EOS_ID = 1, 2


WEIGHT_FORMATS = ("safetensors", "bin")

_VIT_LAYER = {
    "input_layernorm": "norm1",
    "post_attention_layernorm": "norm2",
    "self_attn.dense": "attn.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_ABSTRACTOR_LAYER = {
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
# The decoder layer is LLaMA's (LLAMA_LAYER); Owl2 doubles these keys as `.multiway.{0,1}` (text,
# visual) for its modality-adaptive module.
_MODAL_KEYS = (
    "self_attn.k_proj",
    "self_attn.v_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def name_map(cfg: OwlConfig, variant: ModelVariant) -> dict[str, str]:
    """Their key -> our key for every tensor that maps one to one (up to a reshape).

    Not in the map: the fused ViT qkv (split per head) and the buffers (recomputed)."""
    layout = variant.release
    names: dict[str, str] = {
        f"{layout.decoder}embed_tokens.weight": "decoder.embed_tokens.weight",
        f"{layout.decoder}norm.weight": "decoder.norm.weight",
        layout.lm_head: "decoder.lm_head.weight",
        f"{layout.vision}embeddings.cls_token": "vision.class_embedding",
        f"{layout.vision}embeddings.patch_embed.weight": "vision.patch_embed.weight",
        f"{layout.vision}embeddings.position_embedding": "vision.position_embedding",
        layout.queries: "abstractor.queries",
        f"{layout.abstractor}vit_eos": "abstractor.end_of_image",
    }
    decoder_layer = LLAMA_LAYER
    if layout.multiway:
        decoder_layer = {k: v for k, v in LLAMA_LAYER.items() if k not in _MODAL_KEYS}
        decoder_layer.update({f"{k}.multiway.0": LLAMA_LAYER[k] for k in _MODAL_KEYS})
        decoder_layer.update({f"{k}.multiway.1": f"{LLAMA_LAYER[k]}_visual" for k in _MODAL_KEYS})
    d, v, a = cfg.decoder, cfg.vision, cfg.abstractor
    names.update(
        layer_names(decoder_layer, d.num_layers, f"{layout.decoder}layers.", "decoder.layers.")
    )
    parts = ("weight", "bias")
    for part in parts:
        names[f"{layout.vision}embeddings.pre_layernorm.{part}"] = f"vision.pre_norm.{part}"
        names[f"{layout.vision}post_layernorm.{part}"] = f"vision.post_norm.{part}"
        names[f"{layout.abstractor}visual_fc.{part}"] = f"abstractor.proj.{part}"
    vit, abstractor = f"{layout.vision}encoder.layers.", f"{layout.abstractor}encoder.layers."
    names.update(layer_names(_VIT_LAYER, v.num_layers, vit, "vision.layers.", parts))
    names.update(
        layer_names(_ABSTRACTOR_LAYER, a.num_layers, abstractor, "abstractor.layers.", parts)
    )
    return names


def _qkv_key(layout: ReleaseLayout, layer: int, part: str) -> str:
    return f"{layout.vision}encoder.layers.{layer}.self_attn.query_key_value.{part}"


def expected_buffers(cfg: OwlConfig, variant: ModelVariant) -> dict[str, torch.Tensor]:
    """The persistent buffers their save_pretrained writes, as we recompute them (fp32)."""
    layout = variant.release
    d = cfg.decoder
    exponent = torch.arange(0, d.head_dim, 2, dtype=torch.int64).float() / d.head_dim
    inv_freq = 1.0 / (d.rope_theta**exponent)
    buffers = {
        f"{layout.decoder}layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq
        for i in range(d.num_layers)
    }
    if layout.positions:
        a = cfg.abstractor
        grid = cfg.vision.image_size // cfg.vision.patch_size
        query_pos = sincos_1d(a.width, torch.arange(a.num_queries))
        key_pos = sincos_2d_with_cls(a.width, grid)
        for k in range(a.num_layers):
            prefix = f"{layout.abstractor}encoder.layers.{k}.crossattention.attention."
            buffers[prefix + "q_pos_embed"] = query_pos
            buffers[prefix + "k_pos_embed"] = key_pos
    return buffers


def check_buffers(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> None:
    """Each saved buffer must equal the recomputed one to its dtype's precision (their positions are
    computed in float32 numpy, ours in float64; a bf16 save rounds them)."""
    for key, want in expected.items():
        if key not in state:
            continue
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{source}: buffer {key} has shape {tuple(got.shape)}, the config gives "
                f"{tuple(want.shape)}: the release's sizes (grid, queries, head_dim) differ"
            )
        tol = max(1e-4, 4 * torch.finfo(got.dtype).eps) if got.dtype.is_floating_point else 0
        diff = (got.float() - want).abs().max().item()
        if diff > tol * (1 + want.abs().max().item()):
            raise ValueError(
                f"{source}: buffer {key} differs from the value recomputed from the config "
                f"(max |diff| {diff:.3g}): rope_theta, head_dim or the position grid do not match"
            )


def _split_qkv(tensor: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """Their fused qkv output is laid out (heads, 3, head_dim): not chunk(3)."""
    width = tensor.shape[0] // 3
    grouped = tensor.reshape(num_heads, 3, width // num_heads, *tensor.shape[1:])
    return [grouped[:, i].reshape(width, *tensor.shape[1:]) for i in range(3)]


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    width = q.shape[0]
    per_head = [t.reshape(num_heads, width // num_heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(3 * width, *q.shape[1:])


def from_release(
    cfg: OwlConfig, state: dict[str, torch.Tensor], variant: ModelVariant, source: str
) -> dict[str, torch.Tensor]:
    """Our state dict from a release state dict; unknown or missing keys are errors listing them."""
    layout = variant.release
    state = dict(state)
    check_buffers(state, expected_buffers(cfg, variant), source)
    for key in expected_buffers(cfg, variant):
        state.pop(key, None)
    names = name_map(cfg, variant)
    ours: dict[str, torch.Tensor] = {}
    missing = []
    for j in range(cfg.vision.num_layers):
        for part in ("weight", "bias"):
            key = _qkv_key(layout, j, part)
            if key not in state:
                missing.append(key)
                continue
            q, k, v = _split_qkv(state.pop(key), cfg.vision.num_heads)
            for name, tensor in zip("qkv", (q, k, v)):
                ours[f"vision.layers.{j}.attn.{name}_proj.{part}"] = tensor
    missing += sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{source}: not the {variant.title} release layout for this config; "
            f"missing keys {missing[:20]}; unexpected keys {unexpected[:20]}"
        )
    for theirs, tensor in state.items():
        ours[names[theirs]] = tensor
    # Their [1, 1, D] / [1, N, D] parameters are plain vectors / matrices in ours.
    for key in ("vision.class_embedding", "abstractor.end_of_image"):
        ours[key] = ours[key].reshape(-1)
    for key in ("vision.position_embedding", "abstractor.queries"):
        ours[key] = ours[key].reshape(-1, ours[key].shape[-1])
    return ours


def to_release(
    cfg: OwlConfig, ours: dict[str, torch.Tensor], variant: ModelVariant
) -> dict[str, torch.Tensor]:
    """The release state dict (parameters and buffers, as their save_pretrained writes them)."""
    layout = variant.release
    ours = dict(ours)
    if cfg.decoder.tie_embeddings:
        ours.setdefault("decoder.lm_head.weight", ours["decoder.embed_tokens.weight"].clone())
    reverse = {v: k for k, v in name_map(cfg, variant).items()}
    out: dict[str, torch.Tensor] = {}
    for j in range(cfg.vision.num_layers):
        for part in ("weight", "bias"):
            q, k, v = (ours.pop(f"vision.layers.{j}.attn.{n}_proj.{part}") for n in "qkv")
            out[_qkv_key(layout, j, part)] = _fuse_qkv(q, k, v, cfg.vision.num_heads)
    for key, tensor in ours.items():
        if key not in reverse:
            raise ValueError(f"{key}: no place for it in the {variant.title} release layout")
        out[reverse[key]] = tensor
    width, hidden = cfg.vision.width, cfg.decoder.hidden
    cls_key, pos_key = (
        f"{layout.vision}embeddings.{n}" for n in ("cls_token", "position_embedding")
    )
    out[cls_key] = out[cls_key].reshape(1, 1, width)
    out[pos_key] = out[pos_key].reshape(1, -1, width)
    out[layout.queries] = out[layout.queries].reshape(1, -1, cfg.abstractor.width)
    out[f"{layout.abstractor}vit_eos"] = out[f"{layout.abstractor}vit_eos"].reshape(1, 1, hidden)
    dtype = out[layout.queries].dtype
    out.update({k: v.to(dtype).clone() for k, v in expected_buffers(cfg, variant).items()})
    return out


# ------------------------------------------------------------------------------------ configs


def _count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _sections(hf: dict, variant: ModelVariant) -> tuple[dict, dict, dict]:
    """(vision, abstractor, text) sections of a release config.json."""

    def section(path: tuple[str, ...]) -> dict:
        found = hf
        for key in path:
            found = found.get(key) or {}
        return found

    vision, abstractor, text = variant.release.sections
    return section(vision), section(abstractor), section(text)


def config_from_release(
    hf: dict, state: dict[str, torch.Tensor], variant: ModelVariant, base: OwlConfig
) -> OwlConfig:
    """Sizes from tensor shapes; head counts, eps and rope from their config.json, else their
    config classes' defaults (token ids and the rest from `base`)."""
    layout = variant.release
    vision_hf, abstractor_hf, text_hf = _sections(hf, variant)
    for key in (f"{layout.decoder}embed_tokens.weight", layout.queries):
        if key not in state:
            raise ValueError(
                f"no {key}: not an {variant.title} release "
                f"(its keys start with {sorted({k.split('.')[0] for k in state})[:5]})"
            )
    embed = state[f"{layout.decoder}embed_tokens.weight"]
    num_heads = text_hf.get("num_attention_heads", 32)
    head_dim = embed.shape[1] // num_heads
    k_proj = f"{layout.decoder}layers.0.self_attn.k_proj." + (
        "multiway.0." if layout.multiway else ""
    )
    patch = state[f"{layout.vision}embeddings.patch_embed.weight"]
    num_positions = state[f"{layout.vision}embeddings.position_embedding"].shape[-2]
    queries = state[layout.queries]
    abstractor_layer0 = f"{layout.abstractor}encoder.layers.0.crossattention."
    unsupported = {
        "rope_scaling": (text_hf.get("rope_scaling"), None),
        "vision hidden_act": (vision_hf.get("hidden_act", "quick_gelu"), "quick_gelu"),
        "vision use_cls_token": (vision_hf.get("use_cls_token", True), True),
        "vision use_post_layernorm": (vision_hf.get("use_post_layernorm", True), True),
    }
    wrong = {k: got for k, (got, want) in unsupported.items() if got != want}
    if wrong:
        raise ValueError(f"config.json {wrong}: not supported (the released models use "
                         f"{ {k: want for k, (_, want) in unsupported.items()} })")  # fmt: skip
    return base.replace(
        variant=variant.name,
        vision={
            "image_size": round((num_positions - 1) ** 0.5) * patch.shape[-1],
            "patch_size": patch.shape[-1],
            "width": patch.shape[0],
            "num_layers": _count_layers(state, f"{layout.vision}encoder.layers."),
            "num_heads": vision_hf.get("num_attention_heads", 16),
            "mlp_dim": state[f"{layout.vision}encoder.layers.0.mlp.fc1.weight"].shape[0],
            "layer_norm_eps": vision_hf.get("layer_norm_eps", _VISION_EPS),
        },
        abstractor={
            "num_queries": queries.shape[-2],
            "width": queries.shape[-1],
            "num_layers": _count_layers(state, f"{layout.abstractor}encoder.layers."),
            "num_heads": abstractor_hf.get("num_attention_heads", 16),
            "ffn_dim": state[abstractor_layer0 + "output.mlp.w1.weight"].shape[0],
            "norm_eps": _ABSTRACTOR_NORM_EPS,
            "layer_norm_eps": abstractor_hf.get("layer_norm_eps", _ABSTRACTOR_FFN_EPS),
            "positional_embeddings": layout.positions,
        },
        decoder={
            "vocab_size": embed.shape[0],
            "hidden": embed.shape[1],
            "num_layers": _count_layers(state, f"{layout.decoder}layers."),
            "num_heads": num_heads,
            "num_kv_heads": state[k_proj + "weight"].shape[0] // head_dim,
            "ffn_dim": state[f"{layout.decoder}layers.0.mlp.gate_proj.weight"].shape[0],
            "rms_norm_eps": text_hf.get("rms_norm_eps", 1e-6),
            "rope_theta": float(text_hf.get("rope_theta", 10000.0)),
            "max_positions": text_hf.get("max_position_embeddings", 2048),
            "modality_adaptive": layout.multiway,
            "tie_embeddings": False,
        },
    )


def _unhonoured_fields(cfg: OwlConfig, variant: ModelVariant) -> dict[str, tuple[object, str]]:
    """Field -> (value their code needs, why), for the fields of `cfg` their code would not honour.

    Both releases: the abstractor's query/key/post-attention LayerNorms are built without an eps
    (1e-5), and at one width for queries and image features (Owl1: `hidden_size`, Owl2:
    `encoder_hidden_size`); the patch Conv2d takes 3 channels. Owl2 always has the MAM and the
    abstractor's sin-cos positions, Owl1 neither. Owl1 runs on transformers 4.28.1's LlamaConfig,
    which has no `rope_theta` (its rotary base is 10000) and no `num_key_value_heads`; Owl2's own
    LlamaConfig has both."""
    layout = variant.release
    needs: dict[str, tuple[object, object, str]] = {
        "abstractor.norm_eps": (cfg.abstractor.norm_eps, _ABSTRACTOR_NORM_EPS,
                                "their abstractor LayerNorms take no eps"),
        "abstractor.width": (cfg.abstractor.width, cfg.vision.width,
                             "their abstractor norms queries and image features at one width, "
                             "vision.width"),
        "vision.num_channels": (cfg.vision.num_channels, 3, "their patch embedding takes RGB"),
        "decoder.modality_adaptive": (cfg.decoder.modality_adaptive, layout.multiway,
                                      f"{variant.title}'s decoder"),
        "abstractor.positional_embeddings": (cfg.abstractor.positional_embeddings,
                                             layout.positions, f"{variant.title}'s abstractor"),
    }  # fmt: skip
    if layout.old_llama:
        old_llama = "transformers 4.28.1's LLaMA, which mPLUG-Owl runs on, has no such field"
        needs["decoder.rope_theta"] = (cfg.decoder.rope_theta, 10000.0, old_llama)
        needs["decoder.num_kv_heads"] = (cfg.decoder.num_kv_heads, cfg.decoder.num_heads, old_llama)
    return {name: (want, why) for name, (got, want, why) in needs.items() if got != want}


def check_release_fields(cfg: OwlConfig, variant: ModelVariant) -> None:
    """Refuse a model that the authors' code would load wrongly (silently, or with a size error):
    the error names the first such field, its value and the value their code needs."""
    wrong = _unhonoured_fields(cfg, variant)
    if wrong:
        name, (want, why) = next(iter(wrong.items()))
        section, field = name.split(".")
        got = getattr(getattr(cfg, section), field)
        raise ValueError(
            f"model.{name} is {got}: the {variant.title} release layout needs "
            f"{want} ({why}), so their code would not load this model faithfully"
        )


def release_config(cfg: OwlConfig, variant: ModelVariant) -> dict:
    """A config.json their code reads (MPLUGOwl2Config / MplugOwlConfig `to_dict()` fields we set)."""
    check_release_fields(cfg, variant)
    v, a, d = cfg.vision, cfg.abstractor, cfg.decoder
    vision = {
        "hidden_size": v.width,
        "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": v.layer_norm_eps,
    }
    abstractor = {
        "hidden_size": a.width,
        "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "intermediate_size": a.ffn_dim,
        "layer_norm_eps": a.layer_norm_eps,
        "encoder_hidden_size": v.width,
    }
    text = {
        "model_type": "llama",
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden,
        "intermediate_size": d.ffn_dim,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": d.max_positions,
        "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": d.tie_embeddings,
        "bos_token_id": LLAMA_BOS_ID,
        "eos_token_id": LLAMA_EOS_ID,
        "pad_token_id": d.pad_token_id,
    }
    # The variant's own nesting and fields (owl.model.variants).
    return variant.release.config_json(cfg, vision, abstractor, text)


# ------------------------------------------------------------------------------- folders


def convert_release(
    src_dir: str | Path,
    dst_dir: str | Path | None,
    variant: str,
    base: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[OwlConfig, dict[str, torch.Tensor]]:
    """Read a release folder; write our folder to `dst_dir` (unless None). Returns the config and
    our state dict. `progress` gets a line per phase (a 7B release takes minutes)."""
    spec = get_variant(variant)
    src = Path(src_dir)
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder")
    config_path = src / "config.json"
    if not config_path.exists():
        raise ValueError(f"{src}: no config.json; is this the {spec.title} release folder?")
    hf = json.loads(config_path.read_text())
    progress(f"reading {src}")
    state = read_hf_state_dict(src)
    base_cfg = get_config(base or spec.release.base_size)
    cfg = config_from_release(hf, state, spec, base_cfg)
    ours = from_release(cfg, state, spec, str(src))
    if dst_dir is not None:
        progress(f"writing {dst_dir}")
        save_model(model_from_state_dict(cfg, ours, source=str(src)), dst_dir)
    return cfg, ours


def export_release(
    model_dir: str | Path,
    dst_dir: str | Path,
    progress: Callable[[str], None] = lambda m: None,
    tokenizer_dir: str | Path | None = None,
    weights: str = "safetensors",
) -> list[str]:
    """Our folder -> the authors' layout: config.json, the weights (`weights`: "safetensors", or
    "bin" for a stack without the safetensors package; sharded past 2 GB),
    preprocessor_config.json, generation_config.json and, given the folder the model was trained
    with, the tokenizer (`owl.model.release_files`). A folder whose LoRA adapter is kept apart
    (`lora.merge: false`) is written merged: the authors' code has no use for our peft adapter.
    Returns the names of the files written."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights format {weights!r}: one of {WEIGHT_FORMATS}")
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)
    config = release_config(cfg, cfg.variant_spec)
    progress(f"reading {model_dir}")
    if unmerged_adapter(model_dir) is None:
        state = read_safetensors_folder(model_dir, WEIGHTS_FILE, INDEX_FILE)
    else:  # base weights + adapter (`lora.merge: false`): the release holds the trained model
        state = load_model(model_dir).state_dict()
        if cfg.decoder.tie_embeddings:
            state.pop("decoder.lm_head.weight", None)
    dst = Path(dst_dir)
    progress(f"writing {dst}")
    write = write_safetensors if weights == "safetensors" else write_pytorch_bin
    write(to_release(cfg, state, cfg.variant_spec), dst)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    extras = write_release_files(cfg, config, dst, Path(tokenizer_dir) if tokenizer_dir else None)
    return sorted(p.name for p in dst.iterdir() if p.is_file() and p.name not in extras) + extras
