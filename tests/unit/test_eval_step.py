"""The evaluate step on a local Ray with 2 CPU actors: predictions split across actors come back
whole and in order, equal to a single in-process run; metrics and tables are written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from eval_helpers import make_benchmarks, make_model, make_tokenizer

from owl.data.manifest import Manifest
from owl.data.tokenizer import load_tokenizer
from owl.eval.benchmarks import read_benchmark
from owl.eval.generate import predict
from owl.model import get_config, load_model
from pipelines.step import StepContext, StepInput
from pipelines.steps import evaluate


@pytest.fixture(scope="module")
def step_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StepInput]:
    root = tmp_path_factory.mktemp("eval_step")
    tokenizer_root = root / "tokenizer_step"
    make_tokenizer(tokenizer_root / "tokenizer")
    model_root = root / "train_step"
    make_model(model_root / "model", tokenizer_root / "tokenizer")
    make_benchmarks(root / "shapes_step" / "benchmarks", num_per_type=4)
    return {
        name: StepInput(name=name, dir=path, manifest=Manifest(step=name))
        for name, path in (
            ("model", model_root), ("tokenizer", tokenizer_root), ("shapes", root / "shapes_step")
        )
    }  # fmt: skip


def test_evaluate_step_on_two_cpu_actors(
    local_ray: None, step_inputs: dict[str, StepInput], tmp_path: Path
) -> None:
    benchmarks = [f"@shapes/benchmarks/{t}.jsonl" for t in ("vqa", "multiple_choice", "text")]
    cfg = evaluate.Config(
        benchmarks=benchmarks, batch_size=3, num_workers=2, max_new_tokens={"text": 8},
        caption_meteor=False,
    )  # fmt: skip
    ctx = StepContext(
        step="evaluate", out_dir=tmp_path, job_name="test", model=get_config("debug-tiny")
    )
    manifest = evaluate.run(ctx, cfg, step_inputs)

    files = sorted(f.path for f in manifest.files)
    assert files == [
        "predictions/multiple_choice.blank.parquet", "predictions/multiple_choice.parquet",
        "predictions/text.parquet", "predictions/vqa.blank.parquet", "predictions/vqa.parquet",
        "units/multiple_choice.parquet", "units/text.parquet", "units/vqa.parquet",
    ]  # fmt: skip
    for name in ("vqa.accuracy", "vqa.blank_accuracy", "multiple_choice.circular_accuracy",
                 "multiple_choice.blank_circular_accuracy", "text.accuracy"):  # fmt: skip
        assert 0.0 <= manifest.stats[name] <= 1.0
    # Each headline metric with its 95% bootstrap interval, from the per-item units kept.
    for name in ("vqa.accuracy", "multiple_choice.circular_accuracy", "text.accuracy"):
        low, high = manifest.stats[f"{name}_ci95_low"], manifest.stats[f"{name}_ci95_high"]
        assert low <= manifest.stats[name] <= high
    units = pq.read_table(tmp_path / "units" / "vqa.parquet").to_pylist()
    assert sum(u["value"] for u in units) / len(units) == pytest.approx(
        manifest.stats["vqa.accuracy"]
    )
    assert "vqa.blank_accuracy_ci95_low" not in manifest.stats  # the control has none
    assert "text.blank_accuracy" not in manifest.stats  # text has no images to blank
    assert manifest.stats["multiple_choice.count"] == 4.0

    # Split over two actors, the table is the same as one in-process run, in record order.
    shapes_dir = step_inputs["shapes"].dir / "benchmarks"
    records = read_benchmark(shapes_dir / "multiple_choice.jsonl")
    expected = predict(
        load_model(step_inputs["model"].dir / "model"),
        load_tokenizer(step_inputs["tokenizer"].dir / "tokenizer"),
        records, batch_size=3,
    )  # fmt: skip
    table = pq.read_table(tmp_path / "predictions" / "multiple_choice.parquet").to_pylist()
    assert [(r["id"], r["shift"], r["prediction"]) for r in table] == [
        (p["id"], p["shift"], p["prediction"]) for p in expected
    ]
    assert {r["expected"] for r in table if r["id"] == "m1"} == {"A", "B", "C"}  # rotations


def test_config_errors_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="max_new_tokens: unknown type"):
        evaluate.Config(max_new_tokens={"essay": 100})
    with pytest.raises(ValueError, match="benchmarks: list at least one"):
        evaluate.Config(benchmarks=[])


def test_missing_model_folder_is_reported(
    step_inputs: dict[str, StepInput], tmp_path: Path
) -> None:
    inputs = {**step_inputs, "model": StepInput("model", tmp_path, Manifest(step="model"))}
    cfg = evaluate.Config(benchmarks=["@shapes/benchmarks/text.jsonl"], num_workers=1)
    ctx = StepContext(
        step="evaluate", out_dir=tmp_path, job_name="t", model=get_config("debug-tiny")
    )
    with pytest.raises(ValueError, match="no model/ folder"):
        evaluate.run(ctx, cfg, inputs)


def test_evaluate_step_imports_specs_and_writes_submission(
    local_ray: None, step_inputs: dict[str, StepInput], tmp_path: Path
) -> None:
    from official_files import write_vqav2

    write_vqav2(tmp_path / "official")
    q = tmp_path / "official"
    cfg = evaluate.Config(
        benchmarks=[
            f"vqav2:{q}/v2_OpenEnded_mscoco_val2014_questions.json,"
            f"{q}/v2_mscoco_val2014_annotations.json,{q}/val2014",
            f"vqav2_testdev=vqav2:{q}/v2_OpenEnded_mscoco_test-dev2015_questions.json,{q}/test2015",
        ],
        num_workers=2, blank_image_control=False,
    )  # fmt: skip
    ctx = StepContext(
        step="evaluate", out_dir=tmp_path / "out", job_name="t", model=get_config("debug-tiny")
    )
    manifest = evaluate.run(ctx, cfg, step_inputs)
    assert manifest.stats["vqav2.vqa.count"] == 2.0 and "vqav2.vqa.accuracy" in manifest.stats
    assert manifest.stats["vqav2_testdev.vqa.unanswered"] == 1.0
    assert "vqav2_testdev.vqa.accuracy" not in manifest.stats
    assert "submissions/vqav2_testdev.json" in manifest.artifacts
    assert manifest.info["prompts"]["vqav2"] == {"short_answer": 10}
    rows = json.loads((tmp_path / "out/submissions/vqav2_testdev.json").read_text())
    assert [r["question_id"] for r in rows] == [7005] and isinstance(rows[0]["answer"], str)


@pytest.mark.parametrize("merge", [True, False])
def test_evaluation_scores_the_trained_lora_model_merged_or_not(
    step_inputs: dict[str, StepInput], tmp_path: Path, merge: bool
) -> None:
    """Owl1's stage 2 exported by the trainer with the adapter merged (`merge_lora: true`) or kept
    apart next to the base weights (`merge_lora: false`): the evaluation workers hold the trained
    model either way (same logits, same predictions), not the base model."""
    from types import SimpleNamespace

    import torch

    from owl import IMAGE_TOKEN_ID
    from owl.model.lora import apply_lora
    from owl.train.config import TrainConfig
    from owl.train.data_plan import plan_data
    from owl.train.export import export_model
    from owl.train.job import WorkerJob

    torch.manual_seed(0)
    tokenizer_dir = step_inputs["tokenizer"].dir / "tokenizer"
    base = load_model(step_inputs["model"].dir / "model")
    trained = apply_lora(load_model(step_inputs["model"].dir / "model"), modules_to_save=("abstractor",))  # fmt: skip
    with torch.no_grad():  # as after training: the adapters and the abstractor moved
        for name, param in trained.named_parameters():
            if "lora_B" in name or name.startswith("abstractor."):
                param.add_(torch.randn_like(param) * 0.3)
    trained.eval()
    k = base.cfg.num_visual_tokens
    ids = torch.randint(3, 200, (2, k + 8), generator=torch.Generator().manual_seed(0))
    ids[0, 2 : 2 + k] = IMAGE_TOKEN_ID
    batch = (ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    records = read_benchmark(step_inputs["shapes"].dir / "benchmarks" / "vqa.jsonl")
    tokenizer = load_tokenizer(tokenizer_dir)
    with torch.no_grad():
        expected, before = trained(*batch), base.eval()(*batch)
        expected_answers = [p["prediction"] for p in predict(trained, tokenizer, records)]
    engine = SimpleNamespace(module=trained, zero_optimization_stage=lambda: 2)
    cfg = TrainConfig(stage=2).replace(lora={"merge": merge})
    job = WorkerJob(train=cfg, model=base.cfg, data=plan_data(cfg, base.cfg, []))
    export_model(engine, job, tmp_path / "model", rank=0)

    worker = evaluate.EvalWorker(str(tmp_path / "model"), "cpu", "float32", 1)
    with torch.no_grad():
        got = worker.model(*batch)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - before).abs().max() > 1e-2  # not the base model
    assert [p["prediction"] for p in predict(worker.model, tokenizer, records)] == expected_answers
    if not merge:  # the folder itself still holds the base weights, as documented
        stored = load_model(tmp_path / "model", adapter=False).state_dict()
        assert all(
            torch.equal(stored[n], v) for n, v in base.state_dict().items()
            if not n.startswith("abstractor.")
        )  # fmt: skip
