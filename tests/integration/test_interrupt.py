"""`owl stop` / `ray job stop` / `kill` send the driver SIGTERM: the execution record ends as
interrupted with the reason, the step that was computing too, and their MLflow runs (the step's
and the parent's) end KILLED instead of RUNNING forever. The driver here has started Ray (its
`filter` step runs a Ray task), whose ray.init installs its own SIGTERM handler."""

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
from mlflow.tracking import MlflowClient

from tests.integration.fake_steps import fake_job

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"owl run ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_sigterm_closes_records_and_mlflow_runs_as_interrupted(tmp_path):
    storage = tmp_path / "storage"
    raw = fake_job("stopme", storage, stage1={"num_steps": 200, "step_sleep_s": 0.5})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OWL_STEPS_TABLE": "tests.integration.fake_steps:RAY_TABLE",
        "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(job_file)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # stage1 has written its first checkpoint: Ray is up (filter ran a task), stage1 computes.
        checkpoints = lambda: list(storage.glob("steps/stage1/*/checkpoints/step-0.json"))  # noqa: E731
        _wait_for(checkpoints, 240, "stage1 started", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]

    (execution_dir,) = (storage / "executions").iterdir()
    execution = json.loads((execution_dir / "execution.json").read_text())
    assert execution["state"] == "interrupted"
    assert execution["end"] > execution["start"]
    assert execution["error"].startswith("SIGTERM")
    step = json.loads((execution_dir / "steps" / "stage1.json").read_text())
    assert step["state"] == "interrupted" and step["error"].startswith("SIGTERM")
    assert step["end"] > 0

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    parent = client.get_run(execution["mlflow_run_id"])
    stage1 = client.get_run(step["mlflow_run_id"])
    for run in (parent, stage1):
        assert run.info.status == "KILLED"
        assert run.data.tags["owl.error"].startswith("SIGTERM")
    finished = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {r.data.tags["owl.step"]: r.info.status for r in finished} == {
        "download": "FINISHED", "filter": "FINISHED", "stage1": "KILLED",
    }  # fmt: skip
