"""Lineage against a real `mlflow server` process: runs, dataset inputs, metrics, curves,
artifacts and the registered model, read back through MlflowClient; `owl audit` walks them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `tests.integration.fake_steps` is imported by module path

from pipelines import cli  # noqa: E402
from pipelines.jobspec import parse_job  # noqa: E402
from pipelines.lineage import DIGEST_CHARS  # noqa: E402
from pipelines.progress import Reporter  # noqa: E402
from pipelines.runner import Runner  # noqa: E402
from tests.integration.fake_steps import TABLE, fake_job  # noqa: E402

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(tmp / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def run_job(uri: str, storage: Path):
    job = parse_job(fake_job("lineage-fake", storage, mlflow_uri=uri), TABLE)
    return Runner(job, Reporter(quiet=True), table=TABLE).run()


def test_lineage_is_recorded_and_auditable(mlflow_server, tmp_path, capfd):
    first = run_job(mlflow_server, tmp_path)
    second = run_job(mlflow_server, tmp_path)  # all cached
    assert first.ok and second.ok
    client = MlflowClient(mlflow_server)

    # One parent run per execution, a child run per step with cache key, hit/miss, params.
    parent = client.get_run(second.mlflow_run_id)
    assert parent.data.tags["owl.execution_id"] == second.execution_id
    experiment = parent.info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{second.mlflow_run_id}'"
    )
    by_step = {r.data.tags["owl.step"]: r for r in children}
    assert set(by_step) == {"download", "filter", "stage1", "evaluate"}
    assert {r.data.tags["owl.cache"] for r in children} == {"hit"}
    assert by_step["filter"].data.params["config.keep_every"] == "2"
    assert by_step["stage1"].data.tags["owl.cache_key"] == second.steps[2].key

    # Inputs are datasets: digest cut to 36 chars, the full sha256 and producer run id as tags.
    first_runs = {
        r.data.tags["owl.step"]: r
        for r in client.search_runs(
            [experiment], f"tags.`mlflow.parentRunId` = '{first.mlflow_run_id}'"
        )
    }
    download_manifest = json.loads(
        (tmp_path / "steps" / "download" / first.steps[0].key / "manifest.json").read_text()
    )
    (dataset_input,) = by_step["filter"].inputs.dataset_inputs
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert dataset_input.dataset.digest == download_manifest["digest"][:DIGEST_CHARS]
    assert input_tags["owl.sha256"] == download_manifest["digest"]
    assert input_tags["owl.producer_run_id"] == first_runs["download"].info.run_id
    assert input_tags["mlflow.data.context"] == "data"

    # Statistics, drop counts, curves and artifacts of the computing runs.
    filter_run = first_runs["filter"]
    assert filter_run.data.metrics["kept"] == 3.0
    assert filter_run.data.metrics["dropped.filter.keep_every"] == 3.0
    loss = client.get_metric_history(first_runs["stage1"].info.run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [0, 1, 2]
    artifacts = [a.path for a in client.list_artifacts(filter_run.info.run_id)]
    assert "manifest.json" in artifacts

    # The model is registered once per output digest, with an alias and lineage tags.
    assert (
        first.registered_model
        == second.registered_model
        == {"name": "lineage-fake", "version": "1"}
    )
    version = client.get_model_version_by_alias("lineage-fake", "current")
    assert version.tags["owl.run.stage1"] == first_runs["stage1"].info.run_id
    assert version.tags["owl.digest.download"] == download_manifest["digest"]
    assert version.tags["owl.job"] == "lineage-fake"

    # `owl audit model` walks back to the source step and its parameters.
    capfd.readouterr()  # drop what the runs printed
    assert (
        cli.main(
            ["audit", "model", "lineage-fake@current", "--mlflow-uri", mlflow_server, "--json"]
        )
        == 0
    )
    audit = json.loads(capfd.readouterr().out)
    assert [e["step"] for e in audit["chain"]] == ["stage1", "filter", "download"]
    assert audit["chain"][-1]["params"]["config.num_rows"] == "6"
    assert audit["chain"][1]["counts"]["rows"] == 3.0
    assert (
        cli.main(
            [
                "audit",
                "dataset",
                download_manifest["digest"][:16],
                "--mlflow-uri",
                mlflow_server,
                "--json",
            ]
        )
        == 0
    )
    usage = json.loads(capfd.readouterr().out)
    assert [p["run_id"] for p in usage["producers"] if p["cache"] == "miss"] == [
        first_runs["download"].info.run_id
    ]
    assert {c["step"] for c in usage["consumers"]} == {"filter"} and len(usage["consumers"]) == 2
