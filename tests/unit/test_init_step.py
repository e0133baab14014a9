"""The `init` step: tiny CLIP and LLaMA folders written by transformers' save_pretrained (or an
authors' release) -> the starting model stage 1 reads, cached by the folders' content, recorded in
MLflow as dataset inputs that `owl audit model` reaches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from owl.model import load_model
from pipelines.jobspec import parse_job
from pipelines.progress import Reporter
from pipelines.runner import Runner
from pipelines.sink import NullLineage
from tests.unit import release_reference as ref
from tests.unit import tiny_pretrained

MODEL = {
    "name": "debug-tiny",
    "variant": "owl2",
    "overrides": {
        # 64 px / patch 8: an 8x8 grid, where the CLIP checkpoint has 4x4 (its 32 px)
        "vision": {"image_size": 64, "patch_size": 8, "width": 32, "num_layers": 1,
                   "num_heads": 2, "mlp_dim": 64},
        "decoder": {"vocab_size": 128, "hidden": 64, "num_layers": 2, "num_heads": 4,
                    "num_kv_heads": 2, "ffn_dim": 96},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    tiny_pretrained.save_clip_and_llama(root / "clip", root / "llama")
    return {"clip": root / "clip", "llama": root / "llama"}


def _job(storage: Path, pretrained: dict[str, str], model: dict = MODEL):
    raw = {"name": "init-test", "storage": str(storage), "seed": 3,
           "model": {**model, "pretrained": pretrained}, "init": {}}  # fmt: skip
    return parse_job(raw)


def _run(job, lineage=None):
    result = Runner(job, Reporter(quiet=True), lineage or NullLineage()).run()
    assert result.ok, result.error
    return result


def test_clip_and_llama_folders_become_the_starting_model(tmp_path: Path, folders) -> None:
    job = _job(tmp_path / "s", {k: str(v) for k, v in folders.items()})
    result = _run(job)
    out = tmp_path / "s" / "steps" / "init" / result.steps[0].key
    model = load_model(out / "model")
    assert model.cfg == job.owl_config
    clip = load_file(str(folders["clip"] / "model.safetensors"))
    clip = {k.removeprefix("vision_model."): v for k, v in clip.items()}
    llama = load_file(str(folders["llama"] / "model.safetensors"))
    # Positions: CLS unchanged, the 4x4 patch grid resampled bicubic to 8x8.
    positions = clip["embeddings.position_embedding.weight"]
    got = model.vision.position_embedding.detach()
    assert torch.equal(got[0], positions[0])
    grid = positions[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(got[1:], resized.permute(0, 2, 3, 1).reshape(64, 32), atol=1e-6)
    assert torch.equal(model.vision.layers[0].attn.q_proj.weight, clip["encoder.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    # The language model is the LLaMA folder's, bit for bit; the MAM visual copies start equal.
    for i in range(2):
        layer = model.decoder.layers[i]
        for ours, theirs in (("attn.k_proj", "self_attn.k_proj"), ("mlp.down_proj", "mlp.down_proj"), ("input_norm", "input_layernorm")):  # fmt: skip
            expected = llama[f"model.layers.{i}.{theirs}.weight"]
            assert torch.equal(layer.get_parameter(f"{ours}.weight"), expected)
        assert torch.equal(layer.attn.k_proj_visual.weight, layer.attn.k_proj.weight)
        assert torch.equal(layer.post_attn_norm_visual.weight, layer.post_attn_norm.weight)
    assert torch.equal(model.decoder.embed_tokens.weight, llama["model.embed_tokens.weight"])
    assert torch.equal(model.decoder.lm_head.weight, llama["lm_head.weight"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["vision_grid"] == "4x4 -> 8x8"
    assert set(manifest["info"]["pretrained"]) == {"clip", "llama"}
    # Cached by content: a second run is a hit; touching a weight file's bytes recomputes.
    assert _run(job).steps[0].state == "cached"
    weights = folders["llama"] / "config.json"
    data = json.loads(weights.read_text())
    data["_note"] = "changed"
    weights.write_text(json.dumps(data))
    assert _run(job).steps[0].state == "done"


def test_same_grid_keeps_positions_and_the_abstractor_follows_the_seed(
    tmp_path: Path, folders
) -> None:
    small = {**MODEL, "overrides": {**MODEL["overrides"], "vision": {**MODEL["overrides"]["vision"], "image_size": 32}}}  # fmt: skip
    first = _run(_job(tmp_path / "a", {"clip": str(folders["clip"])}, small))
    model = load_model(tmp_path / "a" / "steps" / "init" / first.steps[0].key / "model")
    clip = CLIPVisionModel.from_pretrained(folders["clip"])
    assert torch.equal(model.vision.position_embedding, clip.embeddings.position_embedding.weight)
    second = _run(_job(tmp_path / "b", {"clip": str(folders["clip"])}, small))
    again = load_model(tmp_path / "b" / "steps" / "init" / second.steps[0].key / "model")
    assert torch.equal(model.abstractor.queries, again.abstractor.queries)


def test_release_folder_through_the_step(tmp_path: Path) -> None:
    state, config = ref.make_release("owl1")
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}  # a bf16 release
    src = ref.write_release(state, config, tmp_path / "release")
    s = ref.SIZES
    model = {
        "name": "owl1-llama-7b",
        "overrides": {
            "vision": {"image_size": s["image"], "patch_size": s["patch"], "width": s["vit_width"],
                       "num_layers": s["vit_layers"], "num_heads": s["vit_heads"], "mlp_dim": s["vit_mlp"]},
            "abstractor": {"num_queries": s["queries"], "width": s["vit_width"], "num_layers": s["abs_layers"],
                           "num_heads": s["abs_heads"], "ffn_dim": s["abs_ffn"]},
            "decoder": {"vocab_size": s["vocab"], "hidden": s["hidden"], "num_layers": s["layers"],
                        "num_heads": s["heads"], "num_kv_heads": s["kv_heads"], "ffn_dim": s["ffn"],
                        "max_positions": 256},
        },
    }  # fmt: skip
    result = _run(_job(tmp_path / "s", {"owl1": str(src)}, model))
    ours = load_model(tmp_path / "s" / "steps" / "init" / result.steps[0].key / "model")
    assert {p.dtype for p in ours.parameters()} == {torch.float32}  # one dtype: fp32
    assert torch.equal(ours.decoder.embed_tokens.weight, state["language_model.model.embed_tokens.weight"].float())  # fmt: skip
    wrong = {**model, "overrides": {**model["overrides"], "decoder": {**model["overrides"]["decoder"], "max_positions": 512}}}  # fmt: skip
    failed = Runner(_job(tmp_path / "t", {"owl1": str(src)}, wrong), Reporter(quiet=True), NullLineage()).run()  # fmt: skip
    assert not failed.ok and "model.decoder.max_positions" in failed.error


def test_bad_folders_are_one_line_errors(tmp_path: Path, folders) -> None:
    cases = [
        ({"clip": str(tmp_path / "nope")}, "no such folder"),
        ({"clip": str(folders["llama"])}, "patch_size"),
        ({"owl2": str(folders["clip"]), "llama": str(folders["llama"])}, "is a whole model"),
    ]
    for pretrained, message in cases:
        result = Runner(_job(tmp_path / "x", pretrained), Reporter(quiet=True), NullLineage()).run()
        assert not result.ok and message in result.error, result.error


def test_pretrained_folders_are_dataset_inputs_that_audit_reaches(tmp_path: Path, folders) -> None:
    from pipelines.audit import audit_model
    from pipelines.sink import mlflow_lineage

    job = _job(tmp_path / "s", {k: str(v) for k, v in folders.items()})
    lineage = mlflow_lineage(job)
    result = _run(job, lineage)
    out = tmp_path / "s" / "steps" / "init" / result.steps[0].key
    manifest = json.loads((out / "manifest.json").read_text())
    run_id = manifest["info"]["mlflow_run_id"]
    lineage.register_model("init-test", out / "model", run_id, manifest["digest"], {})
    chain = audit_model(job.mlflow_uri, "init-test@current")["chain"]
    assert [entry["step"] for entry in chain] == ["init"]
    inputs = {i["step"]: i["digest"] for i in chain[0]["inputs"]}
    assert inputs == {
        f"pretrained.{k}": manifest["info"]["pretrained"][k]["sha256"] for k in ("clip", "llama")
    }
    assert inputs["pretrained.llama"] == manifest["info"]["input_files"][str(folders["llama"])]
    paths = {i["step"]: i.get("path") for i in chain[0]["inputs"]}
    assert paths == {f"pretrained.{k}": str(folders[k]) for k in ("clip", "llama")}


def test_stage1_starts_from_the_init_step_and_refuses_a_second_start(tmp_path: Path) -> None:
    from owl.data.manifest import Manifest
    from owl.train.config import TrainConfig
    from pipelines.step import StepInput
    from pipelines.steps.train import _init_model_dir

    inputs = {"init": StepInput("init", tmp_path / "init", Manifest(step="init"))}
    assert _init_model_dir(TrainConfig(stage=1), inputs) == str(tmp_path / "init" / "model")
    with pytest.raises(ValueError, match="remove one"):
        _init_model_dir(TrainConfig(stage=1, init_model="/somewhere"), inputs)
    assert _init_model_dir(TrainConfig(stage=1, init_model="/somewhere"), {}) == "/somewhere"
