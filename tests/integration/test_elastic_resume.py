"""A stage resumed on another number of workers (owl.data.step_stream + DeepSpeed's universal
checkpoint), on local processes (gloo, CPU), debug-tiny model, 40 optimizer steps:

- ZeRO-2 and ZeRO-3: a 2-worker run's checkpoint resumed on 1 worker, and that run's resumed
  on 2 again, train every step on the 2-worker run's samples, with its losses within 1e-5
  (relative); that the sample stream itself is the same on any number of workers from step 1 is
  tests/unit/test_step_stream.py's;
- a checkpoint between two log steps resumed: the run logs the whole stage's curves, tokens and
  samples as the uninterrupted run does (the open log window travels in the checkpoint).

W' == W resumes stay bitwise (tests/integration/test_train_ray.py, test_resume.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from elastic_runs import run
from test_train_ray import MODEL, _write_data

from owl.data.loader import shards_from_manifest
from owl.train.config import TrainConfig
from owl.train.data_plan import plan_data
from owl.train.job import WorkerJob

pytestmark = pytest.mark.integration

STEPS, HALF = 40, 20


def _job(data, zero_stage: int, **changes) -> WorkerJob:
    cfg = (
        TrainConfig(stage=1, trainable="all", log_every=1, seed=3)
        .replace(
            optimizer={"lr": 1e-3},
            schedule={"warmup_steps": 5, "max_steps": STEPS},
            batch={"micro_batch_size": 2, "grad_accum": 1, "max_length": 64},
            memory={"zero_stage": zero_stage},
            checkpoint={"every": HALF},
            resources={"num_workers": 2},
        )
        .replace(**changes)
    )
    shards = shards_from_manifest(data.manifest, data.dir)
    return WorkerJob(train=cfg, model=MODEL, data=plan_data(cfg, MODEL, shards))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("tokenized"), count=80)


def _assert_same_training(run_a, run_b, first_step: int = 1) -> None:
    """Same samples per step, losses within 1e-5 relative, from `first_step` on."""
    (samples_a, loss_a, _), (samples_b, loss_b, _) = run_a, run_b
    assert samples_a[first_step - 1 :] == samples_b[-len(samples_a[first_step - 1 :]) :]
    losses_a = dict(loss_a)
    resumed = [(s, v) for s, v in loss_b if s >= first_step]  # the curve before: restored
    assert [s for s, _ in resumed] == list(range(first_step, STEPS + 1))
    for step, value in resumed:
        assert value == pytest.approx(losses_a[step], rel=1e-5, abs=0), step


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resumed_on_fewer_then_on_more_workers(data, tmp_path, zero_stage: int) -> None:
    """2 -> 1 -> 2 workers: the 2-worker run's step-10 checkpoint resumed on 1 worker, and that
    run's step-20 checkpoint resumed on 2 again (its optimizer state re-partitioned twice):
    every step trains on the 2-worker run's samples, with its losses within 1e-5 relative (in
    fact bitwise here, both stages). Under ZeRO-3 this needs owl's repair of DeepSpeed 0.19.8's
    ZeRO-3 universal load (owl/train/checkpoint.py `_repair_zero3_universal_load`): with only
    one of its two repairs the losses drifted from the first update after the resume (up to
    3.3e-3 or 1.7e-4 relative by step 40)."""
    job = _job(data, zero_stage=zero_stage, checkpoint={"every": 10})
    port = 29631 + 10 * zero_stage
    two = run(job, 2, tmp_path / "two", port=port)
    assert len(two[0]) == STEPS and all(two[0])
    checkpoint = tmp_path / "two" / "checkpoints" / f"step-{10:08d}"
    shrunk = run(job, 1, tmp_path / "shrunk", resume=checkpoint, port=port + 1)
    _assert_same_training(two, shrunk, first_step=11)
    assert (checkpoint / "ds" / f"step-{10:08d}-universal").is_dir()
    # 1 -> 2: the 1-worker run's optimizer state split over two workers.
    checkpoint = tmp_path / "shrunk" / "checkpoints" / f"step-{HALF:08d}"
    grown = run(job, 2, tmp_path / "grown", resume=checkpoint, port=port + 2)
    _assert_same_training(two, grown, first_step=HALF + 1)
    assert (checkpoint / "ds" / f"step-{HALF:08d}-universal").is_dir()


def test_resumed_between_log_steps_reports_the_whole_stage(data, tmp_path) -> None:
    """checkpoint.every 3, log_every 2: the step-3 checkpoint falls inside the window logged at
    step 4. Resumed from it, the stage's loss curve (all its points: what MLflow's metric history
    and the loss plot show), learning rate, tokens and samples are the uninterrupted run's; before
    the window travelled in the checkpoint, step 4 logged step 4's loss alone and step 3's tokens
    and samples were never counted. The stage mixes a second dataset 3:1: the samples it drew
    of each (the loader state in the checkpoint) are the uninterrupted run's too."""
    job = _job(
        data,
        2,
        schedule={"max_steps": 6},
        checkpoint={"every": 3},
        log_every=2,
        resources={"num_workers": 1},
    )
    job.train = job.train.replace(data={"mix": {"extra": 1.0}, "data_weight": 3.0})
    extra = _write_data(tmp_path / "extra", count=20)
    mixed = {"extra": shards_from_manifest(extra.manifest, extra.dir)}
    job.data = plan_data(job.train, MODEL, job.data.shards, mixed)
    run(job, 1, tmp_path / "full", port=29634)
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000003"
    run(job, 1, tmp_path / "resumed", resume=checkpoint, port=29635)
    full, resumed = (
        json.loads((tmp_path / n / "state.json").read_text()) for n in ("full", "resumed")
    )
    assert [s for s, _ in resumed["curves"]["loss"]] == [s for s, _ in full["curves"]["loss"]]
    assert [s for s, _ in full["curves"]["loss"]] == [2, 4, 6]
    for name in ("loss", "lr"):
        for (step, value), (_, expected) in zip(resumed["curves"][name], full["curves"][name]):
            assert value == pytest.approx(expected, rel=1e-5, abs=0), (name, step)
    assert (resumed["tokens"], resumed["samples"]) == (full["tokens"], full["samples"])
    drawn = {
        name: torch.load(
            tmp_path / name / "checkpoints" / "step-00000006" / "worker-rank0.pt",
            weights_only=False,
        )["loader"]["streams"][0]["drawn"]
        for name in ("full", "resumed")
    }
    assert drawn["resumed"] == drawn["full"] and min(drawn["full"]) > 0
    assert sum(drawn["full"]) == full["samples"]
