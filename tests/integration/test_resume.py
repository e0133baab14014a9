"""The driver is killed (SIGKILL) during a later step; `owl run` again reuses the finished steps
(asserted from the step records), resumes training from its newest checkpoint, and ends with the
same result as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from owl.data.manifest import Manifest
from pipelines import cache
from pipelines.jobspec import parse_job
from pipelines.progress import Reporter
from pipelines.runner import Runner
from pipelines.sink import NullLineage
from tests.integration.fake_steps import TABLE, fake_job

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def job_raw(storage: Path) -> dict:
    return fake_job("resume-fake", storage, stage1={"num_steps": 8, "step_sleep_s": 1.0})


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_killed_driver_resumes_without_recomputing(tmp_path):
    storage = tmp_path / "storage"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_raw(storage)))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OWL_STEPS_TABLE": "tests.integration.fake_steps:TABLE",
    }
    command = [sys.executable, "-m", "pipelines.cli", "run", str(job_file), "--json"]

    driver = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    checkpoints = storage / "steps" / "stage1"
    wait_until(
        lambda: len(list(checkpoints.glob("*/checkpoints/step-*.json"))) >= 3, 180, "3 checkpoints"
    )
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    (killed,) = cache.read_executions(storage, "resume-fake")
    assert killed.state == "interrupted"  # its process is gone
    killed_steps = {r.step: r.state for r in cache.read_step_records(storage, killed.execution_id)}
    assert killed_steps == {"download": "done", "filter": "done", "stage1": "interrupted"}

    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    records = {r.step: r for r in cache.read_step_records(storage, result["execution_id"])}
    assert {s: r.state for s, r in records.items()} == {
        "download": "cached", "filter": "cached", "stage1": "done", "evaluate": "done",
    }  # fmt: skip
    calls = [line.split()[0] for line in (storage / "calls.log").read_text().splitlines()]
    assert calls == ["download", "filter", "stage1", "stage1", "evaluate"]
    train = next(s for s in result["steps"] if s["step"] == "stage1")
    assert train["metrics"]["resumed_from"] >= 3

    # Same outputs as a run that was never interrupted.
    clean = parse_job(job_raw(tmp_path / "clean"), TABLE)
    reference = Runner(clean, Reporter(quiet=True), NullLineage()).run()
    assert [s["key"] for s in result["steps"]] == [s.key for s in reference.steps]
    for step in ("stage1", "evaluate"):
        resumed = Manifest.read(storage / "steps" / step / records[step].key)
        fresh = Manifest.read(clean.storage / "steps" / step / records[step].key)
        assert resumed.digest == fresh.digest
    assert result["metrics"] == reference.metrics


def test_killed_driver_leaves_no_ray_processes(tmp_path):
    """`owl run` started a local Ray (filter runs a Ray task) and is killed during training:
    nothing of that Ray session may keep running (its dashboard and runtime-env agents did)."""
    import tempfile

    from pipelines.reaper import session_processes

    storage = tmp_path / "storage"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_raw(storage)))
    ray_tmp = tempfile.mkdtemp(prefix="owlk", dir="/tmp")  # short: Ray's socket paths
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OWL_STEPS_TABLE": "tests.integration.fake_steps:RAY_TABLE",
        "RAY_TMPDIR": ray_tmp,
    }
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipelines.cli", "run", str(job_file), "--json"]
    driver = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = storage / "steps" / "stage1"
    wait_until(lambda: list(checkpoints.glob("*/checkpoints/step-*.json")), 240, "a checkpoint")
    assert session_processes(ray_tmp)  # the local Ray is up
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    try:
        wait_until(lambda: not session_processes(ray_tmp), 60, "the Ray processes to exit")
    finally:
        for proc in session_processes(ray_tmp):  # never leave them behind, even on failure
            proc.kill()
