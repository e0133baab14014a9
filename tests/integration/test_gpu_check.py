"""The GPU check's miniature path (`bench/gpu_check.py --device cpu`), so the script cannot rot
before a GPU runs it: the stage-2 step through the training loop's engine and generation run
here, and the JSON's numbers are checked against what they claim to be (the FLOP formula itself
is checked against torch's counter in tests/unit/test_train_flops.py).

Its first part, the demo job through `owl run`, is the demo with fewer images and steps: running
it here too cost ~60 s of CI for what the demo test already runs. So its two pieces are checked
apart: the `--set` values it passes are validated by `owl run --dry-run` (below, for both
devices), and the summary it reads from the job's manifests is read from the full demo's own
storage in tests/e2e/test_demo.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from owl.model import get_config
from owl.train.metrics import flop_terms, train_flops

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check") / "result.json"
    # The job's local Ray in a folder of its own (a short path: Ray's socket paths are limited).
    ray_tmp = tempfile.mkdtemp(prefix="rgpu-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(out.parent), "RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--json"]
    command += ["--parts", "train,generate"]
    command += ["--out", str(out), "--peak-tflops", "0.5", "--time-scale", "4"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == json.loads(out.read_text())
    return json.loads(out.read_text()), done.stderr


def test_prints_one_table_of_every_part(check: tuple[dict, str]) -> None:
    result, stderr = check
    assert result["ok"] and result["device"] == "cpu"
    assert list(result["parts"]) == ["train", "generate"]
    table = stderr[stderr.index("GPU check on") :].splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["train", "OK"], ["generate", "OK"]]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_job_parts_settings_pass_validation(device: str, tmp_path: Path) -> None:
    """The job part's `--set` values shrink jobs/demo.yaml into a job `owl run` accepts (a
    renamed field or a step that moved would fail the check on its GPU day, not here)."""
    from bench.gpu_check import job_overrides

    storage = tmp_path / "storage"
    command = [sys.executable, "-m", "pipelines.cli", "run", "jobs/demo.yaml", "--dry-run"]
    command += ["--json", *job_overrides(device, storage)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = {step["name"]: step for step in json.loads(done.stdout)["steps"]}
    gpus = 1 if device == "cuda" else 0
    for step in ("stage1", "stage2", "evaluate_stage1", "evaluate"):
        assert plan[step]["resources"]["num_workers"] == 1
        assert plan[step]["resources"]["gpus_per_worker"] == gpus
    assert not storage.exists()  # a dry run writes nothing


def test_train_step_numbers_follow_the_flop_formula(check: tuple[dict, str]) -> None:
    train = check[0]["parts"]["train"]
    assert train["engine"]["zero_stage"] == 3 and train["train_config"]["zero_stage"] == 3
    assert train["train_config"]["activation_checkpointing"] is True  # the recipe's stage 2
    cfg = get_config("debug-tiny", decoder={"num_layers": train["model"]["decoder_layers"]})
    steps = train["steps"]
    assert len(steps) == 4 and all(s["images"] > 0 and s["tokens"] > 0 for s in steps)
    for s in steps:
        counts = {k: int(s[k]) for k in ("tokens", "images")}
        assert s["flops"] == train_flops(cfg, attention_pairs=int(s["attention_pairs"]), **counts)
    last = steps[-1]
    assert train["flop_terms_last_step"] == flop_terms(
        cfg, tokens=int(last["tokens"]), attention_pairs=int(last["attention_pairs"]),
        images=int(last["images"]),
    )  # fmt: skip
    seconds = sum(s["time_s"] for s in steps)
    assert train["flops_per_s"] == pytest.approx(sum(s["flops"] for s in steps) / seconds)
    assert train["tokens_per_s"] == pytest.approx(sum(s["tokens"] for s in steps) / seconds)
    assert train["mfu"] == pytest.approx(train["flops_per_s"] / 0.5e12)
    plan = train["memory_plan"]
    assert plan["zero_stage"] == 3 and plan["total_gib"] > plan["model_states_gib"] > 0
    assert train["peak_memory_gib"] is None  # measured on CUDA only


def test_generation_made_every_token(check: tuple[dict, str]) -> None:
    generate = check[0]["parts"]["generate"]
    assert set(generate["batches"]) == {"1", "8"}
    for batch, numbers in generate["batches"].items():
        assert numbers["new_tokens"] == int(batch) * 16
        assert numbers["tokens_per_s"] == pytest.approx(numbers["new_tokens"] / numbers["seconds"])
