"""The real pipeline on the multi-node cluster (tests/integration/multinode.py: a head and two
worker nodes, each with its own /tmp, /dev/shm and home, no project sources on any node).

- A small demo job (the demo's synthetic data and steps, tiny sizes, few steps) submitted with
  `owl submit`: every step completes and the model is registered; the Train workers ran on both
  worker nodes and the Ray Data tasks ran on worker nodes, never on the driver's (the head); a
  cached local re-run with `--verify` finds every output complete, digests checked. A step that
  read a node-local path another node wrote would fail here: no node sees another's /tmp.
- Node loss: the same job with stage 2 allowed Ray Train retries. One worker node is killed
  (SIGKILL to every process of its namespace) after stage 2's first checkpoint and started again
  a few seconds later; stage 2 recovers by itself, its final weights equal the uninterrupted
  run's bit for bit, and its MLflow run shows the failure and the recovery.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.multinode import PYTHON, ROOT, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

CHECKPOINT_EVERY = 2
STAGE2_STEPS = 6


def small_demo(storage: Path, max_failures: int) -> dict:
    """jobs/demo.yaml on tiny data and few steps (no stage-1 evaluation)."""
    raw = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    del raw["evaluate_stage1"]
    raw["storage"] = str(storage)
    raw["shapes"].update(num_caption_images=48, num_instruction_images=24, num_text=12,
                         num_eval=4, num_eval_vqa=4)  # fmt: skip
    raw["download"].update(number_sample_per_shard=16, processes_count=1, thread_count=2)
    for step in ("tokenize_captions", "tokenize_instructions"):
        raw[step]["max_length"] = 64
    for stage, steps in (("stage1", 2), ("stage2", STAGE2_STEPS)):
        raw[stage]["schedule"].update(max_steps=steps, warmup_steps=1)
        raw[stage]["checkpoint"].update(every=CHECKPOINT_EVERY)
        raw[stage]["batch"].update(micro_batch_size=2, max_length=64)
    raw["stage2"]["resources"]["max_failures"] = max_failures
    raw["evaluate"].update(limit=2, blank_image_control=False)
    return raw


def owl(cluster: Cluster, *args: str, timeout: float = 3000) -> subprocess.CompletedProcess:
    env = {**cluster.env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def submit(cluster: Cluster, job_file: Path) -> subprocess.Popen:
    """`owl submit JOB --wait` in the background (it returns when the job ends)."""
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipelines.cli", "submit", str(job_file), "--address",
               cluster.address, "--python", str(PYTHON), "--wait", "--json"]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(cluster: Cluster, proc: subprocess.Popen, job_file: Path) -> dict:
    out, err = proc.communicate(timeout=3000)
    submitted = json.loads(out) if out.strip() else {}
    if submitted.get("status") != "SUCCEEDED":
        logs = owl(cluster, "logs", submitted.get("submission_id", "?"), "--address",
                   cluster.address)  # fmt: skip
        pytest.fail(f"{submitted} {err[-2000:]}\n{logs.stdout[-6000:]}")
    status = owl(cluster, "status", str(job_file), "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    return json.loads(status.stdout)


def write_job(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_dir(storage: Path, status: dict, step: str) -> Path:
    key = next(s["key"] for s in status["steps"] if s["step"] == step)
    return storage / "steps" / step / key


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no weights in {model_dir}"
    return tensors


@pytest.fixture(scope="module")
def demo(multinode: Cluster) -> tuple[Path, dict, list[dict]]:
    storage = multinode.storage / "demo"
    job_file = write_job(multinode.storage / "demo.yaml", small_demo(storage, max_failures=2))
    status = finish(multinode, submit(multinode, job_file), job_file)
    return storage, status, multinode.placements()


def test_small_job_runs_across_the_nodes_and_registers(multinode, demo) -> None:
    storage, status, placed = demo
    assert {s["state"] for s in status["steps"]} == {"done"}, status["steps"]
    assert [s["step"] for s in status["steps"]][-1] == "export"
    assert all(s["mlflow_run_id"] for s in status["steps"])
    assert status["registered_model"]["name"] == "demo"

    nodes = multinode.alive_nodes()
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    workers = {n["node_id"] for n in nodes if not n["is_head_node"]}
    assert len(head) == 1 and len(workers) == 2
    train = {p["node_id"] for p in placed if p["name"] == "RayTrainWorker"}
    assert train == workers  # each stage's two workers, one per worker node
    data = {p["node_id"] for p in placed if p["kind"] == "task" and p["node_id"]}
    assert data and data <= workers, placed  # Ray Data and evaluation ran off the driver's node

    # Every output complete: a local re-run (no Ray, nothing to compute) checks every digest.
    rerun = owl(multinode, "run", str(multinode.storage / "demo.yaml"), "--verify", "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["ok"] and {s["state"] for s in result["steps"]} == {"cached"}, result


def progress_step(storage: Path, since: float) -> float:
    """Stage 2's latest reported step in an execution started after `since` (0: none yet)."""
    for path in storage.glob("executions/*/progress-stage2.json"):
        if path.stat().st_mtime >= since:
            try:
                return float(json.loads(path.read_text()).get("step", 0.0))
            except ValueError:
                return 0.0
    return 0.0


def test_node_lost_during_stage2_recovers_to_identical_weights(multinode, demo) -> None:
    storage, reference, _ = demo
    # Same job, stage 2 with one more allowed failure: a new key for stage 2 (and what follows),
    # every earlier step comes from the cache.
    job_file = write_job(multinode.storage / "loss.yaml", small_demo(storage, max_failures=3))
    started = time.time()
    proc = submit(multinode, job_file)
    deadline = time.monotonic() + 2400
    while progress_step(storage, started) < CHECKPOINT_EVERY + 1:  # a step after a checkpoint
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "stage 2 did not get past its first checkpoint"
        time.sleep(0.2)
    killed_at = time.time()
    assert multinode.kill(1) > 0
    time.sleep(5)
    multinode.start(1)
    status = finish(multinode, proc, job_file)
    multinode.wait_for_nodes(3)

    out = stage_dir(storage, status, "stage2")
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["stats"]
    assert stats["steps"] == STAGE2_STEPS
    assert stats["worker_failures"] >= 1 and stats["resumed_from_step"] >= CHECKPOINT_EVERY
    events = manifest["info"]["train_events"]
    recovered = [e for e in events if e["event"] == "recovered"]
    assert events[0]["event"] == "failure" and recovered
    print(f"kill -> next training step: {recovered[-1]['time'] - killed_at:.1f} s; "
          f"failure seen -> next step: {stats['recovery_s']:.1f} s")  # fmt: skip
    # Bitwise the uninterrupted run's weights.
    expected = weights(stage_dir(storage, reference, "stage2") / "model")
    got = weights(out / "model")
    assert got.keys() == expected.keys()
    assert all(got[k].equal(expected[k]) for k in expected)

    # MLflow: the stage's run has the failure and the recovery.
    from mlflow.tracking import MlflowClient

    run_id = next(s["mlflow_run_id"] for s in status["steps"] if s["step"] == "stage2")
    metrics = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["worker_failures"] == stats["worker_failures"]
    assert metrics["recovery_s"] == stats["recovery_s"]
    assert metrics["resumed_from_step"] >= CHECKPOINT_EVERY
