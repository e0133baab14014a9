"""`owl run`'s console and MLflow set-up on light fake steps: only the job's final model moves
`@current`; the tracking URI from the environment wins over the default store and `owl status`
says which; the experiment is a model-training one; logs go to console.log and the terminal gets
owl's own lines, without ANSI codes when it is not a terminal, ending with the model version and
where to look."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from pipelines.jobspec import parse_job
from pipelines.lineage import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from pipelines.progress import Reporter, captured_output, training_message
from pipelines.runner import Runner
from pipelines.status import job_status
from tests.integration.fake_steps import TWO_STAGE_TABLE, fake_job

ROOT = Path(__file__).resolve().parents[2]


def two_stage(storage: Path, **extra) -> dict:
    return fake_job("twostage", storage, stage2={"num_steps": 2}, **extra)


def run(raw: dict, until: str | None = None):
    job = parse_job(raw, TWO_STAGE_TABLE)
    return job, Runner(job, Reporter(quiet=True)).run(until=until)


def test_only_the_jobs_final_model_moves_current(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job, partial = run(two_stage(tmp_path), until="stage1")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's export of it is undone
    client = MlflowClient(job.mlflow_uri)
    assert partial.ok and partial.registered_model == {"name": "twostage", "version": "1"}
    assert client.get_registered_model("twostage").aliases == {}  # a stage-1 model: no alias

    _, full = run(two_stage(tmp_path))
    assert full.registered_model == {"name": "twostage", "version": "2"}
    current = client.get_model_version_by_alias("twostage", "current")
    assert str(current.version) == "2" and current.tags["owl.model_step"] == "stage2"

    _, again = run(two_stage(tmp_path), until="stage1")  # cached stage 1: @current stays put
    assert again.registered_model == {"name": "twostage", "version": "1"}
    assert str(client.get_model_version_by_alias("twostage", "current").version) == "2"

    # Dataset inputs are named after the step that made them and described in their profile.
    stage2 = client.get_run(current.tags["owl.run.stage2"])
    inputs = {i.dataset.name: i for i in stage2.inputs.dataset_inputs}
    assert set(inputs) == {"filter", "stage1"}
    profile = json.loads(inputs["filter"].dataset.profile)
    assert profile["description"] == "output of step filter, read as 'data'"
    assert profile["rows"] == 3 and profile["files"] == 1 and len(profile["sha256"]) == 64

    experiment = client.get_experiment_by_name("twostage")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_tracking_uri_from_the_environment_wins_over_the_default(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    job = parse_job(two_stage(tmp_path / "storage"), TWO_STAGE_TABLE)
    assert job.mlflow_uri == f"sqlite:///{store}"
    status = job_status(job)
    assert status["mlflow_uri"] == f"sqlite:///{store}"
    assert status["mlflow_uri_from"] == "MLFLOW_TRACKING_URI"
    explicit = parse_job(two_stage(tmp_path, mlflow_uri="http://example:5000"), TWO_STAGE_TABLE)
    assert explicit.mlflow_uri == "http://example:5000"  # the job file's own still wins
    assert job_status(explicit)["mlflow_uri_from"] == "job file"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = parse_job(two_stage(tmp_path / "storage"), TWO_STAGE_TABLE)
    assert default.mlflow_uri.endswith("/storage/mlflow.db")
    assert job_status(default)["mlflow_uri_from"].startswith("default SQLite")


def test_captured_output_sends_fds_to_the_log_and_yields_the_terminal(tmp_path, capfd):
    log = tmp_path / "x" / "console.log"
    with captured_output(log) as terminal:
        os.write(1, b"from fd 1\n")  # what Ray, DeepSpeed and the steps print lands there
        os.write(2, b"from fd 2\n")
        print("from sys.stdout", flush=True)  # the Python objects too (MLflow prints to them)
        print("from sys.stderr", file=sys.stderr, flush=True)
        subprocess.run(["echo", "from a subprocess"], check=True)
        terminal.write("owl line\n")
    out, err = capfd.readouterr()
    assert "owl line" in err and "from" not in out + err
    assert log.read_text().splitlines() == [
        "from fd 1", "from fd 2", "from sys.stdout", "from sys.stderr", "from a subprocess"
    ]  # fmt: skip


def test_training_message_has_loss_throughput_and_eta():
    message = training_message(
        {"step": 40.0, "loss": 2.5, "tokens_per_s": 12345.6, "step_time_s": 0.5}, 100
    )
    assert message == "loss 2.5000, 12,346 tok/s, ETA 0m30s"
    assert training_message({"step": 1.0, "loss": 1.0}, None) == "loss 1.0000"


def test_owl_run_console_is_owls_own_lines_and_ends_with_the_model(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(two_stage(tmp_path / "storage")))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OWL_STEPS_TABLE": "tests.integration.fake_steps:TWO_STAGE_TABLE",
        "TERM": "xterm-256color",  # not a terminal anyway (a pipe): no ANSI codes
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(job_file)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "\x1b[" not in console
    lines = console.splitlines()
    assert all(line.startswith("[owl]") or line.startswith(" ") or line[:5] in ("group", "all  ")
               or line.split()[0] in ("vision", "abstractor", "decoder", "language") for line in lines
               if line.strip()), console  # fmt: skip
    assert lines[-3] == "[owl] registered model twostage version 1 (@current)"
    # The link opens the UI's model-training view (runs, metrics, models), not its GenAI one.
    assert re.search(r"then http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning$", lines[-2]), lines[-2]  # fmt: skip
    assert lines[-1].startswith("[owl] lineage: owl audit model twostage@current --mlflow-uri ")
    (execution,) = (tmp_path / "storage" / "executions").iterdir()
    assert (execution / "console.log").is_file()
    record = json.loads((execution / "execution.json").read_text())
    assert record["state"] == "done"


def test_live_bar_keeps_the_whole_status_at_120_columns():
    from io import StringIO

    from rich.console import Console

    from pipelines.progress import RichReporter

    screen = StringIO()
    reporter = RichReporter(Console(file=screen, force_terminal=True, width=120))
    reporter.start("stage2")
    message = training_message(
        {"step": 900.0, "loss": 1.23456, "tokens_per_s": 23456.7, "step_time_s": 0.31}, 1800
    )
    reporter.update("stage2", 900, 1800, message)
    reporter.bars.refresh()
    reporter.finish(
        "stage2", "interrupted", 12.5, "SIGTERM: stopped (owl stop, ray job stop or kill)"
    )
    reporter.bars.stop()
    text = screen.getvalue()
    assert "loss 1.2346, 23,457 tok/s, ETA 4m39s" in text
    assert "interrupted SIGTERM: stopped (owl stop, ray job stop or kill)" in text


def test_the_demo_summary_fits_one_screen_one_row_per_step():
    """The end of a demo run on a 120-column terminal: the bars give way to the summary table,
    one line per step (the metrics the demo's steps really report), then three lines."""
    from io import StringIO

    from rich.console import Console

    from pipelines.progress import RichReporter, StepSummary

    evaluation = {
        "vqa.accuracy": 0.942, "vqa.blank_accuracy": 0.262, "caption.CIDEr": 22.94,
        "multiple_choice.circular_accuracy": 0.02, "text.accuracy": 1.0, "vqa.count": 500.0,
    }  # fmt: skip
    reported = {
        "shapes": {"num_caption_images": 4000.0, "num_eval_caption": 100.0, "num_eval_text": 100.0,
                   "num_eval_multiple_choice": 100.0},
        "download": {"failed_to_download": 0.0, "failed_to_resize": 0.0, "num_images": 4000.0,
                     "num_shards": 2.0},
        "filter": {"keep_rate": 0.9463, "num_in": 4000.0, "num_out": 3785.0},
        "tokenizer": {"num_texts": 79540.0, "vocab_size": 488.0},
        "tokenize_captions": {"samples_in": 3785.0, "samples_out": 3785.0, "shards": 1.0,
                              "supervised_tokens": 78740.0},
        "tokenize_instructions": {"samples_in": 18000.0, "samples_out": 18000.0, "shards": 2.0},
        "stage1": {"final_loss": 0.48757, "parameters_held_rank0": 1287296.0,
                   "resumed_from_step": 0.0, "samples": 9117.0, "steps": 150.0},
        "stage2": {"final_loss": 0.5462, "parameters_held_rank0": 1287296.0,
                   "resumed_from_step": 0.0, "samples": 1929.0, "steps": 1800.0},
        "evaluate_stage1": evaluation, "evaluate": evaluation, "export": {},
    }  # fmt: skip
    summaries = [
        StepSummary(step, "cached", 0.3, "b4073cd3a5fa0123", metrics)
        for step, metrics in reported.items()
    ]
    screen = StringIO()
    reporter = RichReporter(Console(file=screen, force_terminal=True, width=120))
    for s in summaries:
        reporter.start(s.step)
        reporter.finish(s.step, s.state, s.duration_s, s.key[:12])
    reporter.close(summaries, {"name": "demo", "version": "3"}, "current", ["lineage: owl audit"])
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    final = [line for line in text.split("owl run")[-1].splitlines() if line.strip()]
    rows = [line for line in final if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == list(reported)  # one line per step
    # the rows, the header (3 lines) and bottom border, the caption, the two lines after it
    assert len(final) == len(reported) + 4 + 1 + 2, "\n".join(final)
    assert "vqa=0.942, blank=0.262, CIDEr=22.94, mc=0.02, text=1" in text
    assert "final_loss=0.4876, steps=150, samples=9,117" in text
    assert "samples_out=18,000" in text and "num_out=3,785, keep_rate=0.9463" in text
