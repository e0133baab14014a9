"""Our folder format, and the converter from the authors' released Owl2 layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from owl import IMAGE_TOKEN_ID
from owl.model import build_model, get_config, load_model, save_model
from owl.model import weights as weights_module
from owl.model.model import OwlModel
from pipelines.cli import main as owl_cli


def _batch(model: OwlModel) -> tuple[torch.Tensor, torch.Tensor]:
    k = model.cfg.num_visual_tokens
    ids = torch.randint(0, model.cfg.decoder.vocab_size, (2, 2 * k + 6))
    ids[0, 1 : 1 + k] = IMAGE_TOKEN_ID
    ids[1, 3 : 3 + k] = IMAGE_TOKEN_ID
    size = model.cfg.vision.image_size
    return ids, torch.randn(2, 3, size, size)


def _logits(model: OwlModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*batch)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = build_model("debug-tiny")
    batch = _batch(model)
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))


def test_large_models_are_sharded_with_an_index(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(weights_module, "MAX_SHARD_BYTES", 100_000)
    model = build_model("debug-tiny")
    save_model(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    batch = _batch(model)
    assert torch.equal(_logits(model, batch), _logits(load_model(tmp_path), batch))


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    cfg = get_config("debug-tiny", decoder={"tie_embeddings": True})
    model = build_model(cfg)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    assert loaded.decoder.lm_head.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    save_model(build_model("debug-tiny"), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["decoder.extra.weight"] = state.pop("decoder.norm.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['decoder.norm.weight'\]") as err:
        load_model(tmp_path)
    assert "unexpected keys ['decoder.extra.weight']" in str(err.value)


# ------------------------------------------------------------------ the authors' released layout


def _to_release_layout(model: OwlModel) -> dict[str, torch.Tensor]:
    """Write our weights the way the authors' Owl2 release names them (independent inverse map)."""
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": ours.pop("decoder.embed_tokens.weight"),
        "model.norm.weight": ours.pop("decoder.norm.weight"),
        "lm_head.weight": ours.pop("decoder.lm_head.weight"),
    }
    for i in range(model.cfg.decoder.num_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        for proj in ("q_proj", "o_proj"):
            out[f"{dst}.self_attn.{proj}.weight"] = ours.pop(f"{src}.attn.{proj}.weight")
        for proj in ("k_proj", "v_proj"):
            out[f"{dst}.self_attn.{proj}.multiway.0.weight"] = ours.pop(f"{src}.attn.{proj}.weight")
            out[f"{dst}.self_attn.{proj}.multiway.1.weight"] = ours.pop(
                f"{src}.attn.{proj}_visual.weight"
            )
        for theirs, mine in (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attn_norm")):  # fmt: skip
            out[f"{dst}.{theirs}.multiway.0.weight"] = ours.pop(f"{src}.{mine}.weight")
            out[f"{dst}.{theirs}.multiway.1.weight"] = ours.pop(f"{src}.{mine}_visual.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}.mlp.{proj}.weight"] = ours.pop(f"{src}.mlp.{proj}.weight")
    vit = "model.vision_model"
    width, heads = model.cfg.vision.width, model.cfg.vision.num_heads
    out[f"{vit}.embeddings.cls_token"] = ours.pop("vision.class_embedding").view(1, 1, width)
    out[f"{vit}.embeddings.patch_embed.weight"] = ours.pop("vision.patch_embed.weight")
    out[f"{vit}.embeddings.position_embedding"] = ours.pop("vision.position_embedding")[None]
    for part in ("weight", "bias"):
        out[f"{vit}.embeddings.pre_layernorm.{part}"] = ours.pop(f"vision.pre_norm.{part}")
        out[f"{vit}.post_layernorm.{part}"] = ours.pop(f"vision.post_norm.{part}")
        for j in range(model.cfg.vision.num_layers):
            src, dst = f"vision.layers.{j}", f"{vit}.encoder.layers.{j}"
            q, k, v = (ours.pop(f"{src}.attn.{n}_proj.{part}") for n in "qkv")
            # per head: (heads, 3, head_dim, ...) interleaved, as in their fused Linear
            fused = torch.stack([t.view(heads, width // heads, *t.shape[1:]) for t in (q, k, v)], 1)
            out[f"{dst}.self_attn.query_key_value.{part}"] = fused.reshape(3 * width, *q.shape[1:])
            out[f"{dst}.self_attn.dense.{part}"] = ours.pop(f"{src}.attn.o_proj.{part}")
            out[f"{dst}.input_layernorm.{part}"] = ours.pop(f"{src}.norm1.{part}")
            out[f"{dst}.post_attention_layernorm.{part}"] = ours.pop(f"{src}.norm2.{part}")
            out[f"{dst}.mlp.fc1.{part}"] = ours.pop(f"{src}.mlp.fc1.{part}")
            out[f"{dst}.mlp.fc2.{part}"] = ours.pop(f"{src}.mlp.fc2.{part}")
        out[f"model.visual_abstractor.visual_fc.{part}"] = ours.pop(f"abstractor.proj.{part}")
        for j in range(model.cfg.abstractor.num_layers):
            src = f"abstractor.layers.{j}"
            dst = f"model.visual_abstractor.encoder.layers.{j}.crossattention"
            pairs = {
                "attention.query": "attn.q_proj", "attention.key": "attn.k_proj",
                "attention.value": "attn.v_proj", "norm1": "norm_q", "normk": "norm_k",
                "output.out_proj": "attn.o_proj", "output.norm2": "norm2",
                "output.mlp.w1": "mlp.w1", "output.mlp.w2": "mlp.w2", "output.mlp.w3": "mlp.w3",
                "output.mlp.ffn_ln": "mlp.ffn_norm",
            }  # fmt: skip
            for theirs, mine in pairs.items():
                out[f"{dst}.{theirs}.{part}"] = ours.pop(f"{src}.{mine}.{part}")
    out["model.visual_abstractor.query_embeds"] = ours.pop("abstractor.queries")[None]
    out["model.visual_abstractor.vit_eos"] = ours.pop("abstractor.end_of_image").view(1, 1, -1)
    assert not ours, f"test map forgot {sorted(ours)}"
    return out


def _write_release(
    model: OwlModel, path: Path, extra: dict[str, torch.Tensor] | None = None
) -> None:
    state = {**_to_release_layout(model), **(extra or {})}
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}  # fmt: skip
    path.mkdir(parents=True)
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, path / name)
    cfg = model.cfg
    config = {
        "num_attention_heads": cfg.decoder.num_heads,
        "rms_norm_eps": cfg.decoder.rms_norm_eps,
        "max_position_embeddings": cfg.decoder.max_positions,
        "visual_config": {
            "visual_model": {"num_attention_heads": cfg.vision.num_heads},
            "visual_abstractor": {"num_attention_heads": cfg.abstractor.num_heads},
        },
    }
    (path / "config.json").write_text(json.dumps(config))


def test_convert_mplug_owl2_round_trip(tmp_path: Path, capsys) -> None:
    # Non-default head counts: the interleaved qkv split must use the right number of heads.
    cfg = get_config("debug-tiny", vision={"num_heads": 4}, decoder={"num_kv_heads": 4})
    model = build_model(cfg)
    _write_release(model, tmp_path / "release")
    code = owl_cli(["convert", "mplug-owl2", str(tmp_path / "release"), str(tmp_path / "ours"), "--json"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == sum(
        p.numel() for p in model.parameters()
    )
    converted = load_model(tmp_path / "ours")
    assert converted.cfg.vision == model.cfg.vision
    assert converted.cfg.abstractor == model.cfg.abstractor
    assert converted.cfg.decoder == model.cfg.decoder
    batch = _batch(model)
    assert torch.equal(_logits(model, batch), _logits(converted, batch))


def test_convert_rejects_keys_outside_the_release_layout(tmp_path: Path) -> None:
    model = build_model("debug-tiny")
    _write_release(model, tmp_path / "release", extra={"model.mystery.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"model\.mystery\.weight"):
        weights_module.convert_mplug_owl2(tmp_path / "release", tmp_path / "ours")
