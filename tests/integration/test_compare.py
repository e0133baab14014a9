"""`owl compare` on real evaluation outputs (three `owl eval` runs and an MLflow store): two tiny
models generate through `owl eval`; one of them is scored on a benchmark whose reference answers
are its own replies (so it really is better there). Against itself the difference is 0; against the other model it is significant.
The same outputs read from MLflow (an evaluate run id) give the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from owl.data.manifest import Manifest
from pipelines.cli import main
from tests.unit.eval_helpers import make_model, make_tokenizer

QUESTIONS = [f"{w} {n}?" for w in ("red", "blue", "green", "square") for n in range(6)]


def _eval(model: Path, benchmark: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    argv = ["eval", "--model", str(model), "--benchmark", str(benchmark), "--batch-size", "8",
            "--predictions", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["metrics"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    tokenizer = make_tokenizer(root / "tokenizer")
    return {"a": make_model(root / "a", tokenizer, seed=0),
            "b": make_model(root / "b", tokenizer, seed=1), "root": root}  # fmt: skip


def _compare(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["compare", *argv, "--json"]) == 0
    return {r["benchmark"]: r for r in json.loads(capsys.readouterr().out)["comparisons"]}


def test_compare_real_evaluations(outputs: dict[str, Path], capsys, tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "red.png")

    def write(path: Path, answers: dict[str, str]) -> Path:
        path.write_text("".join(json.dumps({
            "id": f"v{i}", "type": "vqa", "images": ["red.png"], "question": q,
            "answers": [answers.get(f"v{i}", "x")] * 10, "rule": "normalized",
        }) + "\n" for i, q in enumerate(QUESTIONS) if answers.get(f"v{i}", "x").strip()))  # fmt: skip
        return path

    _eval(outputs["a"], write(tmp_path / "asked.jsonl", {}), tmp_path / "first", capsys)
    replies = pq.read_table(tmp_path / "first" / "asked.parquet").to_pylist()
    own = write(tmp_path / "own.jsonl", {r["id"]: r["prediction"] for r in replies})
    scores_a = _eval(outputs["a"], own, tmp_path / "a", capsys)["own"]
    scores_b = _eval(outputs["b"], own, tmp_path / "b", capsys)["own"]
    assert scores_a["vqa.accuracy"] == 1.0 > scores_b["vqa.accuracy"]

    itself = _compare([str(tmp_path / "a"), str(tmp_path / "a")], capsys)["own"]
    assert (itself["difference"], itself["low"], itself["high"]) == (0.0, 0.0, 0.0)
    assert itself["p_value"] == 1.0

    other = _compare([str(tmp_path / "a"), str(tmp_path / "b")], capsys)["own"]
    assert other["metric"] == "accuracy" and other["count"] >= 20
    assert other["difference"] == pytest.approx(scores_a["vqa.accuracy"] - scores_b["vqa.accuracy"])
    assert 0.0 < other["low"] <= other["difference"] <= other["high"]
    assert other["p_value"] < 0.01

    # The same per-item scores as an evaluate step run's artifacts in MLflow, by run id.
    from pipelines.lineage import Lineage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage = Lineage(uri, "compare", str(tmp_path / "artifacts"))
    run_ids = {}
    for name in ("a", "b"):
        manifest = Manifest(step="evaluate")
        manifest.artifacts.append("units/own.parquet")
        manifest.write(tmp_path / name)
        run_ids[name] = lineage.start_step("evaluate", name, "2", {}, hit=False)
        lineage.finish_step(run_ids[name], manifest, tmp_path / name, hit=False)
    from_mlflow = _compare([run_ids["a"], run_ids["b"], "--mlflow-uri", uri], capsys)["own"]
    assert from_mlflow == other


def test_compare_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["compare", "0" * 32, str(tmp_path), "--mlflow-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
