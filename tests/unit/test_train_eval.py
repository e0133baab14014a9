"""Evaluation during training, as a job file sets it: validation, the cache key (unchanged for a
stage that does not evaluate), the input a benchmark path names, and the curves read back from
the per-benchmark score files (tests/integration/test_train_ray.py runs it for real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.jobspec import load_job
from pipelines.plan import key_parts
from pipelines.steps._train_eval import read_curves

ROOT = Path(__file__).resolve().parents[2]
VQA = "stage2.evaluate.benchmarks=['@shapes/benchmarks/vqa.jsonl']"


def _stage2(*overrides: str):
    job = load_job(ROOT / "jobs" / "demo.yaml", ["storage=/tmp/owl-unused", *overrides])
    return job, job.steps["stage2"]


def test_a_stage_without_evaluation_keeps_its_key_and_inputs() -> None:
    job, section = _stage2()
    config, _ = key_parts(job, section.spec, section)
    assert "evaluate" not in config
    assert "shapes" not in section.spec.roles

    job, section = _stage2("stage2.evaluate.every=600", VQA, "stage2.evaluate.limit=100")
    config, _ = key_parts(job, section.spec, section)
    assert config["evaluate"]["every"] == 600 and config["evaluate"]["limit"] == 100
    assert section.spec.roles["shapes"].upstream == "shapes"  # the benchmark file's step


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage2.evaluate.every=500", VQA],
         "stage2: evaluate.every (500) must be a multiple of checkpoint.every (600)"),
        (["stage2.evaluate.every=600"], "stage2.evaluate: every needs benchmarks"),
        (["stage2.evaluate.every=600", "stage2.evaluate.benchmarks=['@nowhere/vqa.jsonl']"],
         "names input 'nowhere'"),
        (["stage2.evaluate.every=600", VQA, "stage2.evaluate.vqa_rule=exact"],
         "stage2.evaluate: vqa_rule: 'exact' is not one of"),
    ],
)  # fmt: skip
def test_evaluation_settings_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="stage2") as info:
        _stage2(*overrides)
    assert message in str(info.value)


def test_curves_from_the_score_files(tmp_path: Path) -> None:
    for step, accuracy in ((4, 0.5), (2, 0.25)):
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        metrics = {"vqa.accuracy": accuracy, "vqa.count": 8}
        (folder / "vqa.json").write_text(json.dumps({"step": step, "metrics": metrics}))
    (tmp_path / "step-00000006" / "model").mkdir(parents=True)  # written, not scored yet
    assert read_curves(tmp_path) == {"eval.vqa.accuracy": [(2, 0.25), (4, 0.5)]}
