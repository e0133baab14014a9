"""A real Ray cluster on loopback (a head and two worker nodes, each with its own /tmp and home and
without the project's sources, token auth on): `owl submit` sends a job of light fake steps, it
finishes, its steps are visible in `owl status`, and re-submitting the running job attaches to
it instead of starting a duplicate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.multinode import PYTHON, ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(multinode):
    """(dashboard address, client environment, shared storage root) of the multi-node cluster."""
    return multinode.address, {**multinode.env, "PYTHONPATH": str(ROOT)}, multinode.storage


def owl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipelines.cli", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_submitted_job_runs_on_the_cluster_and_shows_in_status(cluster):
    address, env, shared = cluster
    tmp = shared / "fake"
    tmp.mkdir()
    env = {**env, "OWL_STEPS_TABLE": "tests.integration.fake_steps:RAY_TABLE"}
    job = {
        "name": "cluster-fake",
        "storage": str(tmp / "storage"),
        "model": {"name": "debug-tiny"},
        "download": {"num_rows": 8},
        "filter": {"keep_every": 2},
        "stage1": {"num_steps": 2},
        "evaluate": {},
    }
    job_file = tmp / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    submit = ["submit", str(job_file), "--address", address, "--python", str(PYTHON), "--json"]
    first = owl(submit, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr == ""  # not Ray's packaging and upload lines
    submitted = json.loads(first.stdout)
    assert submitted["action"] == "submitted"
    assert submitted["status"] in ("PENDING", "RUNNING")  # the job's state, not ""
    attached = owl(submit, env)  # still pending or running: attach, no duplicate
    again = json.loads(attached.stdout)
    assert attached.stderr == "" and again["status"] in ("PENDING", "RUNNING")
    assert again == {**submitted, "action": "attached", "status": again["status"]}

    sid = submitted["submission_id"]
    follow = owl(["logs", sid, "--address", address, "--follow"], env)  # returns when the job ends
    assert "[owl] evaluate: done" in follow.stdout, follow.stdout[-4000:] + follow.stderr[-2000:]

    status = json.loads(owl(["status", str(job_file), "--json"], env).stdout)
    assert [(s["step"], s["state"]) for s in status["steps"]] == [
        ("download", "done"), ("filter", "done"), ("stage1", "done"), ("evaluate", "done"),
    ]  # fmt: skip
    assert all(s["mlflow_run_id"] for s in status["steps"])
    assert status["registered_model"] == {"name": "cluster-fake", "version": "1"}
    assert status["metrics"] == {"accuracy": 4.0}
    # `filter` ran its work as a Ray task inside the submitted driver, which saw all three nodes.
    filter_dir = Path(job["storage"]) / "steps" / "filter" / status["steps"][1]["key"]
    assert json.loads((filter_dir / "manifest.json").read_text())["stats"]["ray_nodes"] == 3.0

    # Finished: the same job submitted again is a new submission, not the finished one.
    rerun = json.loads(owl(submit, env).stdout)
    assert rerun["status"] in ("PENDING", "RUNNING")
    assert rerun == {"submission_id": sid + "-r2", "action": "submitted", "status": rerun["status"]}
    stopped = json.loads(
        owl(["stop", rerun["submission_id"], "--address", address, "--json"], env).stdout
    )
    assert stopped["stopped"] is True


def test_infra_readme_token_setup_works_as_written(cluster, tmp_path):
    """infra/README.md's three client lines, run as written (the head's address, a scratch
    storage and the printed id put in): the token comes only from RAY_AUTH_TOKEN_PATH, with no
    RAY_AUTH_MODE in the client's environment. The 7B job then fails on the cluster at its
    validation (its URL list is not here), which ends `owl logs --follow`."""
    address, env, shared = cluster
    readme = (ROOT / "infra" / "README.md").read_text()
    block = re.search(r"## Ray token authentication.*?```bash\n(.*?)```", readme, re.S).group(1)
    export, submit, logs = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert export.startswith("export RAY_AUTH_TOKEN_PATH=~/")

    home = tmp_path / "home"
    home.mkdir()
    client_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    client_env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    token_file = Path(export.split("=", 1)[1].replace("~", str(home)))
    token_file.parent.mkdir(parents=True)
    token_file.write_text(env["RAY_AUTH_TOKEN"])
    token_file.chmod(0o600)

    def shell(line: str) -> subprocess.CompletedProcess:
        line = line.replace("http://HEAD:8265", address)
        line = line.replace("--set storage=/mnt/shared/owl2", f"--set storage={shared / 'readme'}")
        return subprocess.run(["bash", "-c", f"{export}\n{line}"], env=client_env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    submitted = shell(submit)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert submitted.stderr == ""  # owl's two lines only (stdout), none of Ray's
    sid = re.match(
        r"submitted (owl-owl2-llama2-7b-[0-9a-f]{12})$", submitted.stdout.splitlines()[0]
    )
    assert sid, submitted.stdout
    followed = shell(logs.replace("owl-owl2-llama2-7b-<hash>", sid.group(1)))
    assert followed.returncode == 0, followed.stderr[-3000:]
    assert "error: download.url_list: no such file or folder" in followed.stdout, followed.stdout[
        -3000:
    ]

    # The same without the token file: one line that says what to set, no traceback.
    token_file.unlink()
    refused = shell(submit)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: RAY_AUTH_TOKEN_PATH="), refused.stderr
    wrong = dict(client_env, RAY_AUTH_TOKEN="0" * 64)
    bad = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "stop", sid.group(1), "--address", address],
        env=wrong, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "rejected the token" in bad.stderr, bad.stderr
