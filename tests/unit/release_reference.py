"""Test-only stand-ins for the authors' releases (their code needs transformers 4.31, not installable
here): a random checkpoint in their key layout, parameters *and* persistent buffers as their
`save_pretrained` writes them, a config.json shaped like theirs, and a plain forward pass that
follows their numerics (read from X-PLUG/mPLUG-Owl) on that state dict directly. Nothing here uses
owl's name maps or modules, so a converter bug cannot cancel itself out.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZES = {
    "image": 32, "patch": 8, "vit_width": 32, "vit_layers": 2, "vit_heads": 4, "vit_mlp": 64,
    "queries": 4, "abs_layers": 2, "abs_heads": 2, "abs_ffn": 48,
    "vocab": 96, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 80,
    "rope_theta": 10000.0, "rms_eps": 1e-6, "vit_eps": 1e-6, "abs_eps": 1e-6,
}  # fmt: skip


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """As their get_1d_sincos_pos_embed_from_grid: float32 numpy, sin half then cos half."""
    omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _sincos_2d_cls(dim: int, grid: int) -> np.ndarray:
    """As their get_2d_sincos_pos_embed(cls_token=True): meshgrid(w, h), zero CLS row first."""
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    emb = np.concatenate([_sincos_1d(dim // 2, g[0]), _sincos_1d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def _prefixes(variant: str) -> dict[str, str]:
    if variant == "owl2":
        return {"dec": "model.", "head": "lm_head.weight", "vit": "model.vision_model.",
                "abs": "model.visual_abstractor.", "queries": "model.visual_abstractor.query_embeds"}  # fmt: skip
    return {"dec": "language_model.model.", "head": "language_model.lm_head.weight",
            "vit": "vision_model.", "abs": "abstractor.", "queries": "query_tokens"}  # fmt: skip


def make_release(variant: str, s: dict = SIZES, seed: int = 0) -> tuple[dict, dict]:
    """(state dict, config.json dict) of a random release of `variant` at sizes `s`."""
    g = torch.Generator().manual_seed(seed)
    p = _prefixes(variant)
    state: dict[str, torch.Tensor] = {}

    def rand(key: str, *shape: int, norm: bool = False, std: float = 0.1) -> None:
        state[key] = torch.randn(*shape, generator=g) * std + (1.0 if norm else 0.0)

    vw, h, kvw = s["vit_width"], s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"])
    grid = s["image"] // s["patch"]
    rand(p["dec"] + "embed_tokens.weight", s["vocab"], h)
    rand(p["dec"] + "norm.weight", h, norm=True)
    rand(p["head"], s["vocab"], h)
    head_dim = h // s["heads"]
    inv_freq = 1.0 / (s["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(s["layers"]):
        L = f"{p['dec']}layers.{i}."
        rand(L + "self_attn.q_proj.weight", h, h)
        rand(L + "self_attn.o_proj.weight", h, h)
        for m in ("gate_proj", "up_proj"):
            rand(L + f"mlp.{m}.weight", s["ffn"], h)
        rand(L + "mlp.down_proj.weight", h, s["ffn"])
        ways = [".multiway.0", ".multiway.1"] if variant == "owl2" else [""]
        for w in ways:
            rand(L + f"self_attn.k_proj{w}.weight", kvw, h)
            rand(L + f"self_attn.v_proj{w}.weight", kvw, h)
            rand(L + f"input_layernorm{w}.weight", h, norm=True)
            rand(L + f"post_attention_layernorm{w}.weight", h, norm=True)
        state[L + "self_attn.rotary_emb.inv_freq"] = inv_freq.clone()  # persistent buffer
    V = p["vit"]
    rand(V + "embeddings.cls_token", 1, 1, vw)
    rand(V + "embeddings.patch_embed.weight", vw, 3, s["patch"], s["patch"])
    rand(V + "embeddings.position_embedding", 1, grid * grid + 1, vw)
    for part, norm in (("weight", True), ("bias", False)):
        rand(V + f"embeddings.pre_layernorm.{part}", vw, norm=norm)
        rand(V + f"post_layernorm.{part}", vw, norm=norm)
        for j in range(s["vit_layers"]):
            J = f"{V}encoder.layers.{j}."
            rand(J + f"input_layernorm.{part}", vw, norm=norm)
            rand(J + f"post_attention_layernorm.{part}", vw, norm=norm)
        rand(p["abs"] + f"visual_fc.{part}", *((h, vw) if part == "weight" else (h,)))
    for j in range(s["vit_layers"]):
        J = f"{V}encoder.layers.{j}."
        rand(J + "self_attn.query_key_value.weight", 3 * vw, vw)
        rand(J + "self_attn.query_key_value.bias", 3 * vw)
        rand(J + "self_attn.dense.weight", vw, vw)
        rand(J + "self_attn.dense.bias", vw)
        rand(J + "mlp.fc1.weight", s["vit_mlp"], vw)
        rand(J + "mlp.fc1.bias", s["vit_mlp"])
        rand(J + "mlp.fc2.weight", vw, s["vit_mlp"])
        rand(J + "mlp.fc2.bias", vw)
    rand(p["queries"], 1, s["queries"], vw, std=0.02)  # their init scale: small, so eps matters
    rand(p["abs"] + "vit_eos", 1, 1, h)
    for k in range(s["abs_layers"]):
        A = f"{p['abs']}encoder.layers.{k}.crossattention."
        for name in ("attention.query", "attention.key", "attention.value", "output.out_proj"):
            rand(A + f"{name}.weight", vw, vw)
            rand(A + f"{name}.bias", vw)
        for name, dim in (("norm1", vw), ("normk", vw), ("output.norm2", vw), ("output.mlp.ffn_ln", s["abs_ffn"])):  # fmt: skip
            rand(A + f"{name}.weight", dim, norm=True)
            rand(A + f"{name}.bias", dim)
        for name in ("w1", "w3"):
            rand(A + f"output.mlp.{name}.weight", s["abs_ffn"], vw)
            rand(A + f"output.mlp.{name}.bias", s["abs_ffn"])
        rand(A + "output.mlp.w2.weight", vw, s["abs_ffn"])
        rand(A + "output.mlp.w2.bias", vw)
        if variant == "owl2":  # persistent buffers of MplugOwlVisualAbstractorMultiHeadAttention
            q_pos = _sincos_1d(vw, np.arange(s["queries"], dtype=np.float32))
            state[A + "attention.q_pos_embed"] = torch.from_numpy(q_pos).float()
            state[A + "attention.k_pos_embed"] = torch.from_numpy(_sincos_2d_cls(vw, grid)).float()
    return state, _config(variant, s)


def _config(variant: str, s: dict) -> dict:
    vision = {"hidden_size": s["vit_width"], "intermediate_size": s["vit_mlp"],
              "num_hidden_layers": s["vit_layers"], "num_attention_heads": s["vit_heads"],
              "image_size": s["image"], "patch_size": s["patch"], "layer_norm_eps": s["vit_eps"]}  # fmt: skip
    abstractor = {"hidden_size": s["vit_width"], "num_hidden_layers": s["abs_layers"],
                  "num_attention_heads": s["abs_heads"], "intermediate_size": s["abs_ffn"],
                  "layer_norm_eps": s["abs_eps"]}  # fmt: skip
    text = {"vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["ffn"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "rms_norm_eps": s["rms_eps"],
            "rope_theta": s["rope_theta"], "max_position_embeddings": 256}  # fmt: skip
    if variant == "owl2":
        abstractor.update(num_learnable_queries=s["queries"], grid_size=s["image"] // s["patch"])
        return {**text, "model_type": "mplug_owl2",
                "visual_config": {"visual_model": vision, "visual_abstractor": abstractor}}  # fmt: skip
    return {"model_type": "mplug-owl", "vision_config": vision,
            "visual_abstractor_config": abstractor, "text_config": {**text, "model_type": "llama"},
            "num_query_tokens": s["queries"]}  # fmt: skip


def write_release(state: dict, config: dict, path: Path, fmt: str = "bin") -> Path:
    """As save_pretrained: config.json and two weight shards (.bin with an index, or safetensors)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    keys = sorted(state)
    ext, index_name = ("bin", "pytorch_model.bin.index.json") if fmt == "bin" else (
        "safetensors", "model.safetensors.index.json")  # fmt: skip
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for n, shard_keys in enumerate((keys[::2], keys[1::2]), start=1):
        name = f"{stem}-{n:05d}-of-00002.{ext}"
        shard = {k: state[k].contiguous() for k in shard_keys}
        torch.save(shard, path / name) if fmt == "bin" else save_file(shard, str(path / name))
        weight_map.update(dict.fromkeys(shard_keys, name))
    (path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------- their forward, written plainly


def _ln(x, state, key, eps):
    return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps)


def _lin(x, state, key):
    return F.linear(x, state[key + ".weight"], state.get(key + ".bias"))


def vision_forward(state: dict, variant: str, s: dict, images: torch.Tensor) -> torch.Tensor:
    V, eps = _prefixes(variant)["vit"], s["vit_eps"]
    x = F.conv2d(images, state[V + "embeddings.patch_embed.weight"], stride=s["patch"])
    x = x.flatten(2).transpose(1, 2)
    cls = state[V + "embeddings.cls_token"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + state[V + "embeddings.position_embedding"][:, : x.shape[1] + 1]
    x = _ln(x, state, V + "embeddings.pre_layernorm", eps)
    heads = s["vit_heads"]
    for j in range(s["vit_layers"]):
        J = f"{V}encoder.layers.{j}."
        h = _ln(x, state, J + "input_layernorm", eps)
        b, n, w = h.shape
        qkv = _lin(h, state, J + "self_attn.query_key_value")
        q, k, v = qkv.reshape(b, n, heads, 3, w // heads).permute(3, 0, 2, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) * (w // heads) ** -0.5, dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, w)
        x = x + _lin(ctx, state, J + "self_attn.dense")
        h = _lin(_ln(x, state, J + "post_attention_layernorm", eps), state, J + "mlp.fc1")
        x = x + _lin(h * torch.sigmoid(1.702 * h), state, J + "mlp.fc2")
    return _ln(x, state, V + "post_layernorm", eps)


def abstractor_forward(state: dict, variant: str, s: dict, feats: torch.Tensor) -> torch.Tensor:
    """Their abstractor: norm1/normk/norm2 at torch's default eps 1e-5, ffn_ln at the config's."""
    p = _prefixes(variant)
    x = state[p["queries"]].expand(feats.shape[0], -1, -1)
    heads = s["abs_heads"]
    for k in range(s["abs_layers"]):
        A = f"{p['abs']}encoder.layers.{k}.crossattention."
        qn = _ln(x, state, A + "norm1", 1e-5)
        enc = torch.cat([qn, _ln(feats, state, A + "normk", 1e-5)], dim=1)
        if variant == "owl2":
            q_pos = state[A + "attention.q_pos_embed"]
            qk_pos = torch.cat([q_pos, state[A + "attention.k_pos_embed"]], 0)[None]
            key, query = _lin(enc + qk_pos, state, A + "attention.key"), qn + q_pos[None]
        else:
            key, query = _lin(enc, state, A + "attention.key"), qn
        value = _lin(enc, state, A + "attention.value")
        query = _lin(query, state, A + "attention.query")
        b, nq, w = query.shape
        q_h, k_h, v_h = (_split_heads(t, heads) for t in (query, key, value))
        scores = q_h @ k_h.transpose(-1, -2) / math.sqrt(w // heads)
        ctx = (torch.softmax(scores, -1) @ v_h).permute(0, 2, 1, 3).reshape(b, nq, w)
        y = qn + _lin(ctx, state, A + "output.out_proj")
        h = _ln(y, state, A + "output.norm2", 1e-5)
        inner = F.silu(_lin(h, state, A + "output.mlp.w1")) * _lin(h, state, A + "output.mlp.w3")
        y = y + _lin(_ln(inner, state, A + "output.mlp.ffn_ln", s["abs_eps"]), state, A + "output.mlp.w2")  # fmt: skip
        x = y
    x = _lin(x, state, p["abs"] + "visual_fc")
    return torch.cat([x, state[p["abs"] + "vit_eos"].expand(x.shape[0], 1, -1)], dim=1)


def _split_heads(t, heads):
    b, n, w = t.shape
    return t.view(b, n, heads, w // heads).permute(0, 2, 1, 3)


def _rope(z, cos, sin):
    half = z.shape[-1] // 2
    return z * cos + torch.cat([-z[..., half:], z[..., :half]], -1) * sin


def _rms(x, weight, *, eps):
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _modal(state, variant, key, visual, fn):
    """Owl2's MultiwayNetwork: module .multiway.0 on text tokens, .multiway.1 on visual ones."""
    if variant != "owl2":
        return fn(state[key + ".weight"])
    text_out, visual_out = fn(state[f"{key}.multiway.0.weight"]), fn(state[f"{key}.multiway.1.weight"])  # fmt: skip
    return torch.where(visual[..., None], visual_out, text_out)


def logits(state: dict, variant: str, s: dict, ids: torch.Tensor, slots: torch.Tensor,
           images: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits (B, T, V): `slots` (B, T) marks the visual positions, filled in order with the
    images' abstractor outputs."""
    p = _prefixes(variant)
    visual_tokens = abstractor_forward(state, variant, s, vision_forward(state, variant, s, images))
    x = F.embedding(ids.masked_fill(slots, 0), state[p["dec"] + "embed_tokens.weight"])
    x = x.masked_scatter(slots[..., None], visual_tokens.reshape(-1, x.shape[-1]))
    b, t, hidden = x.shape
    heads, kv_heads, eps = s["heads"], s["kv_heads"], s["rms_eps"]
    d = hidden // heads
    positions = torch.arange(t).float()
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(s["layers"]):
        L = f"{p['dec']}layers.{i}."
        freqs = (
            positions[:, None] * state[L + "self_attn.rotary_emb.inv_freq"][None]
        )  # from the buffer
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()
        h = _modal(state, variant, L + "input_layernorm", slots, partial(_rms, x, eps=eps))
        q = F.linear(h, state[L + "self_attn.q_proj.weight"]).view(b, t, heads, d).transpose(1, 2)
        k = _modal(state, variant, L + "self_attn.k_proj", slots, partial(F.linear, h))
        v = _modal(state, variant, L + "self_attn.v_proj", slots, partial(F.linear, h))
        k, v = (z.view(b, t, kv_heads, d).transpose(1, 2) for z in (k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d) + causal, -1, dtype=torch.float32).to(q.dtype)  # fmt: skip
        attn = (weights @ v).transpose(1, 2).reshape(b, t, hidden)
        x = x + F.linear(attn, state[L + "self_attn.o_proj.weight"])
        h = _modal(state, variant, L + "post_attention_layernorm", slots, partial(_rms, x, eps=eps))
        gate = F.linear(h, state[L + "mlp.gate_proj.weight"])
        x = x + F.linear(F.silu(gate) * F.linear(h, state[L + "mlp.up_proj.weight"]), state[L + "mlp.down_proj.weight"])  # fmt: skip
    return F.linear(_rms(x, state[p["dec"] + "norm.weight"], eps=eps), state[p["head"]])
