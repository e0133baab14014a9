"""The training stage's failure record and its wait for the cluster's resources, without Ray:
the events Ray Train's callback writes become progress lines and manifest statistics (the stage's
MLflow metrics); a retried stage waits for a lost node's CPUs before it refuses. With real Ray
Train (a worker killed mid-run): tests/integration/test_train_ray.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from owl.train.config import TrainConfig
from pipelines.step import StepContext
from pipelines.steps import _ray_train, _train_failures

FAILURE = {"event": "failure", "time": 100.0, "step": 4.0, "ranks": [1], "error": "node died"}


def _events(*events: dict) -> list[dict]:
    return [dict(e) for e in events]


def test_a_failure_and_its_recovery_become_stats_and_lines() -> None:
    again = dict(FAILURE, time=101.0)  # Ray Train may count one lost node twice
    recovered = {"event": "recovered", "time": 130.5, "step": 5.0}
    events = _events(FAILURE, again, recovered)
    stats, info = _train_failures.summarize(events)
    assert stats == {"worker_failures": 2.0, "recovery_s": 30.5}  # from the first failure
    assert info == {"train_events": events}
    line = _train_failures.describe(events[0], events, max_failures=3)
    assert line.startswith("workers failed after step 4 (ranks [1]: node died)")
    assert "failure 1 of 3 allowed" in line
    assert "failure 2 of 3" in _train_failures.describe(events[1], events, max_failures=3)
    assert _train_failures.describe(events[2], events, 3) == (
        "recovered: training again at step 5, 30s after the failure"
    )


def test_the_recovery_is_split_by_when_the_new_workers_got_ready(tmp_path: Path) -> None:
    """The controller's callback keeps, with the first report after a failure, the times rank 0
    got ready (owl.train.loop sends them with its first report); the line splits the recovery."""
    from owl.train.loop import STARTUP_TIMES

    assert tuple(_train_failures.STARTUP_LABELS) == STARTUP_TIMES
    callback = _train_failures.failure_callback(tmp_path / "events.json")
    callback.after_report(None, [{"step": 2.0}], None)  # before any failure: no event
    callback.after_exception(None, {1: RuntimeError("node died\ntraceback")})
    failed_at = _train_failures.read_events(tmp_path / "events.json")[0]["time"]
    ready = {"worker_start": 52.0, "engine_ready": 60.5, "restored": 61.0}
    callback.after_report(
        None, [{"step": 3.0, "loss": 1.0, **{k: failed_at + v for k, v in ready.items()}}], None
    )
    callback.after_report(None, [{"step": 4.0}], None)  # recovered once
    events = _train_failures.read_events(tmp_path / "events.json")
    assert [e["event"] for e in events] == ["failure", "recovered"]
    assert events[0]["step"] == 2.0 and events[0]["error"] == "node died"
    assert {k: v - failed_at for k, v in events[1]["startup"].items()} == ready
    line = _train_failures.describe(events[1], events, max_failures=3)
    assert line.startswith("recovered: training again at step 3, ")
    assert line.endswith("(training function +52s, DeepSpeed engine +60s, "
                         "checkpoint restored +61s)")  # fmt: skip


def test_nothing_failed_adds_nothing() -> None:
    assert _train_failures.summarize([]) == ({}, {})
    unrecovered = _train_failures.summarize(_events(FAILURE))
    assert unrecovered == ({"worker_failures": 1.0}, {"train_events": [FAILURE]})


def test_new_events_are_shown_once(tmp_path: Path, capsys) -> None:
    path = tmp_path / "events-stage2.json"
    shown: list[tuple] = []
    ctx = StepContext(step="stage2", out_dir=tmp_path, job_name="t", model=None,
                      progress=lambda *a: shown.append(a))  # fmt: skip
    assert _train_failures.show_new(ctx, path, 0, 2) == 0  # no file yet
    path.write_text(json.dumps({"events": [FAILURE]}))
    assert _train_failures.show_new(ctx, path, 0, 2) == 1
    assert _train_failures.show_new(ctx, path, 1, 2) == 1
    assert len(shown) == 1 and shown[0][0] == 4.0
    assert capsys.readouterr().out.startswith("stage2: workers failed after step 4")


CFG = TrainConfig().replace(
    schedule={"max_steps": 2}, resources={"num_workers": 2, "cpus_per_worker": 1.0}
)


def test_a_retry_waits_for_the_resources_to_come_back(monkeypatch) -> None:
    short = ("CPU", "2 workers x 1.0 CPU = 2 CPUs, but the Ray cluster has 1")
    answers = [short, short, None]
    monkeypatch.setattr(_ray_train, "_shortfall", lambda cfg: answers.pop(0))
    lines: list[str] = []
    _ray_train.check_resources(CFG, 5.0, lambda d, t, m: lines.append(m), poll_s=0.01)
    assert answers == [] and len(lines) == 2
    assert lines[0].startswith("waiting for the cluster: 2 workers x 1.0 CPU = 2 CPUs, but")


def test_the_wait_is_bounded_and_the_first_attempt_does_not_wait(monkeypatch) -> None:
    short = ("CPU", "2 workers x 1.0 CPU = 2 CPUs, but the Ray cluster has 1")
    monkeypatch.setattr(_ray_train, "_shortfall", lambda cfg: short)
    message = (
        r"has 1 \(waited 0.05s for it\); lower resources.num_workers or "
        r"resources.cpus_per_worker, or add nodes"
    )
    with pytest.raises(ValueError, match=message):
        _ray_train.check_resources(CFG, 0.05, poll_s=0.01)
    with pytest.raises(ValueError, match=r"cluster has 1; lower resources.num_workers"):
        _ray_train.check_resources(CFG)


def test_the_docs_node_loss_settings_are_a_valid_job() -> None:
    """docs/pipeline.md's YAML block under "When a node dies", merged into the demo job."""
    import re

    import yaml

    from pipelines.jobspec import parse_job

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "pipeline.md").read_text()
    block = re.search(r"## When a node dies.*?```yaml\n(.*?)```", docs, re.S).group(1)
    raw = yaml.safe_load((root / "jobs" / "demo.yaml").read_text())
    for step, section in yaml.safe_load(block).items():
        raw[step].update(section)
    job = parse_job(raw)
    assert job.steps["stage2"].config.resources.max_failures == 3
    assert job.steps["stage2"].config.checkpoint.every == 200
    assert job.steps["stage2"].retries.resource_wait_s == 600
