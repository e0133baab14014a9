"""The `export` step: the final model folder (+ peft adapter), the authors' layout, the model card,
and the card registered with the model in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.data.manifest import FileEntry, Manifest
from owl.model import OwlModel, get_config, load_model, save_model
from owl.model.lora import apply_lora, save_adapter
from owl.model.releases import convert_release
from pipelines.dag import REGISTER_FROM
from pipelines.step import StepContext, StepInput
from pipelines.steps import export

# Release-faithful: the authors' abstractor eps, no grouped KV heads (Owl1's LLaMA has none).
CFG = get_config("debug-tiny", "owl1", abstractor={"norm_eps": 1e-5}, decoder={"num_kv_heads": 4})


def _input(tmp: Path, name: str, run_id: str, **fields) -> StepInput:
    info = {"mlflow_run_id": run_id, **fields.pop("info", {})}
    manifest = Manifest(step=name, info=info, **fields)
    return StepInput(name, tmp / name, manifest)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, StepInput]:
    torch.manual_seed(0)
    base = OwlModel(CFG)
    save_model(base, tmp_path / "stage1" / "model")
    lora = apply_lora(OwlModel(CFG))
    lora.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    save_adapter(lora, tmp_path / "stage2" / "model" / "adapter")
    save_model(OwlModel(CFG), tmp_path / "stage2" / "model")  # stands for the merged weights
    shard = FileEntry("shards/0.arrow", 10, "ab" * 32, rows=7, tokens=321)
    from owl.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(
        iter(["a red circle", "a blue square"] * 20), 270, tmp_path / "tokenizer" / "tokenizer"
    )
    return {
        "tokenizer": _input(tmp_path, "tokenizer", "run-tok"),
        "stage1": _input(
            tmp_path, "stage1", "run-s1", stats={"steps": 5.0, "final_loss": 2.5},
            info={"train_config": {"optimizer": {"lr": 1e-4}, "lora": {"r": 8}}},
        ),
        "stage2": _input(
            tmp_path, "stage2", "run-s2", stats={"steps": 3.0, "final_loss": 1.25},
            info={"train_config": {"optimizer": {"lr": 2e-5}, "lora": {"r": 8}},
                  "trainable_parameters": {"lora": {"trainable": 64, "total": 64}}},
        ),
        "evaluate": _input(
            tmp_path, "evaluate", "run-ev",
            stats={"vqa.accuracy": 0.8125, "vqa.accuracy_ci95_low": 0.78125,
                   "vqa.accuracy_ci95_high": 0.84375, "vqa.count": 500.0},
        ),
        "captions": _input(tmp_path, "tokenize_captions", "run-tc", files=[shard]),
    }  # fmt: skip


def test_export_writes_our_folder_the_release_layout_and_a_card(tmp_path, inputs) -> None:
    extra = {"execution_id": "e1", "mlflow_ui": "http://mlflow:5000", "mlflow_experiment_id": "7"}
    ctx = StepContext("export", tmp_path / "out", "rehearsal", CFG, extra=extra)
    manifest = export.run(ctx, export.Config(), inputs)
    out = tmp_path / "out" / "model"
    assert REGISTER_FROM[0] == "export"
    listed = {f.path for f in manifest.files}
    assert {"model/config.json", "model/README.md", "model/adapter/adapter_model.safetensors",
            "model/release/config.json", "model/release/model.safetensors",
            "model/release/tokenizer.json", "model/release/tokenizer_config.json",
            "model/release/preprocessor_config.json",
            "model/release/generation_config.json"} <= listed  # fmt: skip
    ours, stage2 = load_model(out), load_model(tmp_path / "stage2" / "model")
    k = CFG.num_visual_tokens
    ids = torch.randint(0, 256, (1, k + 6))
    ids[0, 1 : 1 + k] = IMAGE_TOKEN_ID
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(ids, images), stage2.eval()(ids, images))
    # The authors' layout converts back to the same weights.
    cfg, state = convert_release(out / "release", None, "owl1", base="debug-tiny")
    assert cfg.decoder == CFG.decoder and cfg.abstractor == CFG.abstractor
    for key, tensor in stage2.state_dict().items():
        assert torch.equal(state[key], tensor), key
    card = (out / "README.md").read_text()
    assert "| stage1 | 5 | 0 | 2.5000 | lr=0.0001 |" in card  # no LoRA there: no LoRA settings
    for fact in ("run-s1", "run-s2", "run-ev", "run-tc", "vqa.accuracy", "0.8125", "321",
                 "lr=2e-05, lora.r=8", "peft.PeftModel.from_pretrained", "owl audit model rehearsal@current",
                 "needs the `safetensors` package", "transformers 4.28.1"):  # fmt: skip
        assert fact in card, fact
    # A headline metric with its 95% interval beside it; the bounds are not rows of their own.
    assert "| evaluate | vqa.accuracy | 0.8125 | [0.7812, 0.8438] |" in card
    assert "| evaluate | vqa.count | 500 |  |" in card and "_ci95_" not in card
    # Each step's run id links to its run in the MLflow UI's model-training view.
    link = (
        "[`run-s2`](http://mlflow:5000/#/experiments/7/runs/run-s2?workflowType=machine_learning)"
    )
    assert f"| stage2 | stage2 | {link} |" in card
    # `release_weights: bin`: their stack without the safetensors package reads it
    export.run(StepContext("export", tmp_path / "o2", "j", CFG), export.Config(release_weights="bin"), inputs)  # fmt: skip
    release = tmp_path / "o2" / "model" / "release"
    assert (release / "pytorch_model.bin").exists() and not list(release.glob("*.safetensors"))
    assert "`pytorch_model*.bin`" in (tmp_path / "o2" / "model" / "README.md").read_text()


def test_a_model_without_a_faithful_release_layout_says_how_to_skip_it(tmp_path, inputs) -> None:
    cfg = get_config("debug-tiny", "owl1")  # abstractor norm_eps 1e-6: not the authors' 1e-5
    save_model(OwlModel(cfg), tmp_path / "stage2" / "model")
    ctx = StepContext("export", tmp_path / "out", "j", cfg)
    with pytest.raises(ValueError, match=r"release: false"):
        export.run(ctx, export.Config(), inputs)
    manifest = export.run(StepContext("export", tmp_path / "o2", "j", cfg), export.Config(release=False), inputs)  # fmt: skip
    assert not any(f.path.startswith("model/release/") for f in manifest.files)


def test_the_card_is_the_registered_version_description(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.lineage import Lineage

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "README.md").write_text("# card\nrun ids here\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage = Lineage(uri, "cards", str(tmp_path / "artifacts"))
    run_id = lineage.client.create_run(lineage.experiment_id).info.run_id
    name, version = lineage.register_model("carded", model_dir, run_id, "d" * 64, {})
    assert (
        MlflowClient(uri).get_model_version(name, version).description == "# card\nrun ids here\n"
    )
