"""Our folder format, and the converter from the authors' released Owl2 layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from owl import IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config, load_model, save_model
from owl.model import weights as weights_module


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
    model = OwlModel(get_config("debug-tiny"))
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
    model = OwlModel(get_config("debug-tiny"))
    save_model(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    batch = _batch(model)
    assert torch.equal(_logits(model, batch), _logits(load_model(tmp_path), batch))


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    cfg = get_config("debug-tiny", decoder={"tie_embeddings": True})
    model = OwlModel(cfg)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    assert loaded.decoder.lm_head.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    save_model(OwlModel(get_config("debug-tiny")), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["decoder.extra.weight"] = state.pop("decoder.norm.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['decoder.norm.weight'\]") as err:
        load_model(tmp_path)
    assert "unexpected keys ['decoder.extra.weight']" in str(err.value)


def test_a_tensor_of_the_wrong_shape_is_a_one_line_error(tmp_path: Path) -> None:
    save_model(OwlModel(get_config("debug-tiny")), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["decoder.norm.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"size mismatch for decoder\.norm\.weight") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_structure_only_builds_run_no_init_math(tmp_path: Path) -> None:
    """Parameter counts, the training memory plan and a loaded model are built on meta with init
    skipped: init math on meta tensors makes torch import torch._dynamo, seconds in a fresh
    process (the driver of every `owl run` plans memory). Loading a model imports neither peft
    nor transformers (an evaluation actor pays each import)."""
    import subprocess
    import sys

    save_model(OwlModel(get_config("debug-tiny")), tmp_path / "m")
    code = f"""
import sys
from owl.model import get_config, load_model
from owl.model.summary import summarize
from owl.train.config import TrainConfig
from owl.train.stages import planned_model
summarize(get_config("owl2-llama2-7b"))
planned_model(get_config("owl2-llama2-7b"), TrainConfig(stage=1))
load_model({str(tmp_path / "m")!r})
print("torch._dynamo" in sys.modules, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False", out.stderr[-2000:]
