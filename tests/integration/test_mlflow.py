"""Lineage against a real `mlflow server` process: runs, dataset inputs, metrics, curves,
artifacts and the registered model, read back through MlflowClient; `owl audit` walks them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import cli
from pipelines.jobspec import parse_job
from pipelines.lineage import DIGEST_CHARS
from pipelines.progress import Reporter
from pipelines.runner import Runner
from tests.integration.fake_steps import TABLE, fake_job
from tests.integration.servers import start_mlflow, stop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"), wait_s=120)
    try:
        yield uri
    finally:
        stop(proc)


def run_job(uri: str, storage: Path):
    job = parse_job(fake_job("lineage-fake", storage, mlflow_uri=uri), TABLE)
    return Runner(job, Reporter(quiet=True)).run()


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


CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


def rendered_text(url: str) -> str:
    """The page's visible text after the MLflow UI (a JavaScript app) has rendered in headless
    Chromium."""
    done = subprocess.run(
        [CHROMIUM, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", done.stdout, flags=re.DOTALL)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium: `make chromium` installs it (apt-get, as root)"
)
def test_printed_links_open_the_model_training_view(mlflow_server, tmp_path, monkeypatch, capfd):
    """The run and model links `owl run` prints, opened in a browser: the UI's model-training
    view (a Runs breadcrumb; Runs, Models and Model registry in the sidebar), not its GenAI one
    (Evaluations, Judges, Prompts), which the same URL without owl's query parameter opens."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(fake_job("ui-fake", tmp_path / "s", mlflow_uri=mlflow_server))
    )
    monkeypatch.setenv("OWL_STEPS_TABLE", "tests.integration.fake_steps:TABLE")
    capfd.readouterr()
    assert cli.main(["run", str(job_file)]) == 0
    lines = capfd.readouterr().err.splitlines()
    run_url = next(line for line in lines if line.startswith("[owl] run: ")).split()[-1]
    model_url = next(line for line in lines if line.startswith("[owl] model: ")).split()[-1]
    run_id = run_url.split("/runs/")[1].split("?")[0]
    page = rendered_text(run_url)
    assert run_id in page and "Model registry" in page and "Judges" not in page, page[:1500]
    assert re.search(r"ui-fake Runs ui-fake-\d{8}T", page), page[:1500]  # the breadcrumb
    model_page = rendered_text(model_url)
    assert "Version 1" in model_page and "Judges" not in model_page, model_page[:1500]
    genai = rendered_text(run_url.split("?")[0])  # what the link was without the parameter
    assert "Judges" in genai and "Model registry" not in genai
