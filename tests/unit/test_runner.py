"""The runner on light fake steps: cache hits, keys, --force/--until, retries, verification,
resume, records, and two concurrent `owl run` processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from owl.data.manifest import Manifest
from pipelines import cache
from pipelines.jobspec import parse_job
from pipelines.plan import plan
from pipelines.progress import Reporter
from pipelines.runner import Runner
from pipelines.sink import NullLineage
from pipelines.status import job_status
from tests.integration.fake_steps import TABLE, fake_job

ROOT = Path(__file__).resolve().parents[2]


def job_raw(storage: Path, **sections: dict) -> dict:
    download = {"retry": {"max_retries": 2, "backoff_s": 0.5}, **sections.pop("download", {})}
    return fake_job("fake", storage, download=download, **sections)


def run(raw: dict, sleeps: list[float] | None = None, **kwargs):
    job = parse_job(raw, TABLE)
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    runner = Runner(job, Reporter(quiet=True), NullLineage(), sleep=sleep)
    return job, runner.run(**kwargs)


def states(result) -> dict[str, str]:
    return {s.step: s.state for s in result.steps}


def calls(storage: Path) -> list[str]:
    log = storage / "calls.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def test_second_run_reuses_every_step(tmp_path):
    raw = job_raw(tmp_path)
    _, first = run(raw)
    assert first.ok, first.error
    assert set(states(first).values()) == {"done"}
    job, second = run(raw)
    assert set(states(second).values()) == {"cached"}
    assert calls(tmp_path) == ["download", "filter", "stage1", "evaluate"]
    assert second.metrics == first.metrics == {"accuracy": 3.0}
    records = cache.read_step_records(job.storage, second.execution_id)
    assert [(r.step, r.state) for r in records] == [(s, "cached") for s in TABLE]


def test_config_change_recomputes_only_downstream(tmp_path):
    _, first = run(job_raw(tmp_path))
    _, second = run(job_raw(tmp_path, filter={"keep_every": 3}))
    assert states(second) == {
        "download": "cached",
        "filter": "done",
        "stage1": "done",
        "evaluate": "done",
    }
    assert {s.step: s.key for s in first.steps}["download"] == {
        s.step: s.key for s in second.steps
    }["download"]
    assert second.metrics == {"accuracy": 2.0}


def test_model_config_is_part_of_the_key_of_steps_that_use_it(tmp_path):
    run(job_raw(tmp_path))
    raw = job_raw(tmp_path)
    raw["model"]["overrides"] = {"decoder": {"num_layers": 1}}
    _, result = run(raw)
    assert states(result) == {
        "download": "cached",
        "filter": "cached",
        "stage1": "done",
        "evaluate": "done",
    }


def test_force_reruns_step_and_downstream(tmp_path):
    run(job_raw(tmp_path))
    _, result = run(job_raw(tmp_path), force=["filter"])
    assert states(result) == {
        "download": "cached",
        "filter": "done",
        "stage1": "done",
        "evaluate": "done",
    }
    # A forced training step starts over instead of resuming.
    assert result.steps[2].metrics["resumed_from"] == 0.0


def test_until_runs_only_what_the_step_needs(tmp_path):
    _, result = run(job_raw(tmp_path), until="filter")
    assert states(result) == {"download": "done", "filter": "done"}
    assert result.registered_model == {}
    planned = {p.name: p for p in plan(parse_job(job_raw(tmp_path), TABLE))}
    assert planned["filter"].cached and not planned["stage1"].cached
    assert planned["evaluate"].key is None  # its input is not computed yet


def test_transient_failures_are_retried_with_backoff(tmp_path):
    sleeps: list[float] = []
    job, result = run(job_raw(tmp_path, download={"fail_times": 2}), sleeps)
    assert result.ok, result.error
    assert sleeps == [0.5, 1.0]
    record = next(
        r for r in cache.read_step_records(job.storage, result.execution_id) if r.step == "download"
    )
    assert (record.state, record.attempts) == ("done", 3)


def test_a_retry_may_wait_for_the_clusters_resources(tmp_path):
    """The first attempt refuses at once when the cluster is short of resources (a user error);
    a retry, which may follow a lost node, waits up to `retry.resource_wait_s` for them."""
    raw = job_raw(tmp_path, download={"fail_times": 2, "retry": {"resource_wait_s": 7}})
    job, result = run(raw, [])
    assert result.ok, result.error
    waits = (job.storage / "resource-waits-download").read_text().split()
    assert waits == ["0.0", "7.0", "7.0"]


def test_failed_step_is_recorded_and_retried_on_the_next_run(tmp_path):
    raw = job_raw(tmp_path, download={"fail_times": 3})
    job, result = run(raw)
    assert not result.ok and "flaky source" in result.error
    records = cache.read_step_records(job.storage, result.execution_id)
    assert [(r.step, r.state, r.attempts) for r in records] == [("download", "failed", 3)]
    assert "ConnectionError" in records[0].error
    _, again = run(raw)  # the failure counter is used up: the source now works
    assert again.ok and states(again)["download"] == "done"


def test_errors_a_retry_cannot_fix_are_not_retried(tmp_path):
    sleeps: list[float] = []
    job, result = run(job_raw(tmp_path, filter={"keep_every": 0}), sleeps)
    assert not result.ok and "keep_every must be >= 1" in result.error
    assert sleeps == []
    record = next(
        r for r in cache.read_step_records(job.storage, result.execution_id) if r.step == "filter"
    )
    assert (record.state, record.attempts) == ("failed", 1)


def test_hit_checks_sizes_and_verify_checks_digests(tmp_path):
    job, first = run(job_raw(tmp_path))
    filter_dir = cache.step_dir(job.storage, "filter", first.steps[1].key)
    kept = filter_dir / "kept.txt"
    kept.write_text(kept.read_text().replace("row", "ROW"))  # same size, other content
    _, normal = run(job_raw(tmp_path))
    assert states(normal)["filter"] == "cached"
    _, verified = run(job_raw(tmp_path), verify=True)
    assert states(verified)["filter"] == "done"
    assert "row-0" in kept.read_text()
    kept.unlink()
    _, repaired = run(job_raw(tmp_path))
    assert states(repaired)["filter"] == "done" and kept.exists()


def test_resumable_step_keeps_checkpoints_others_are_emptied(tmp_path):
    raw = job_raw(tmp_path)
    job, _ = run(raw, until="download")
    filter_key = {p.name: p.key for p in plan(job)}["filter"]
    stray = cache.step_dir(job.storage, "filter", filter_key) / "stray.txt"
    stray.parent.mkdir(parents=True)
    stray.write_text("from a dead attempt")
    run(raw, until="filter")
    assert not stray.exists()
    train_key = {p.name: p.key for p in plan(job)}["stage1"]
    checkpoints = cache.step_dir(job.storage, "stage1", train_key) / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (0, 1):  # an earlier attempt died after two steps
        (checkpoints / f"step-{step}.json").write_text(json.dumps({"step": step, "loss": 9.0}))
    _, result = run(raw)
    train = next(s for s in result.steps if s.step == "stage1")
    assert train.metrics["resumed_from"] == 2.0
    assert [p for _, p in json.loads(Path(checkpoints / "step-1.json").read_text()).items()] == [
        1,
        9.0,
    ]


def test_uncommitted_output_is_never_read(tmp_path):
    job, first = run(job_raw(tmp_path), until="download")
    out = cache.step_dir(job.storage, "download", first.steps[0].key)
    (out / "manifest.json").unlink()  # as if the process died before committing
    (out / "leftover.tmp").write_text("partial")
    _, again = run(job_raw(tmp_path), until="download")
    assert states(again) == {"download": "done"}
    assert not (out / "leftover.tmp").exists()
    assert Manifest.read(out).key == first.steps[0].key


def test_status_reports_states_and_registered_model(tmp_path):
    job, result = run(job_raw(tmp_path))
    status = job_status(job)
    assert [s["state"] for s in status["steps"]] == ["done"] * 4
    assert [s["key"] for s in status["steps"]] == [s.key for s in result.steps]
    assert status["metrics"] == {"accuracy": 3.0}
    run(job_raw(tmp_path))
    assert [s["state"] for s in job_status(job)["steps"]] == ["cached"] * 4


def test_two_concurrent_runs_compute_each_step_once(tmp_path):
    storage = tmp_path / "storage"
    raw = job_raw(storage, filter={"sleep_s": 3.0})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OWL_STEPS_TABLE": "tests.integration.fake_steps:TABLE",
    }
    command = [sys.executable, "-m", "pipelines.cli", "run", str(job_file), "--json"]
    procs = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out) for out, _ in outputs]
    assert sorted(calls(storage)) == sorted(["download", "filter", "stage1", "evaluate"])
    assert results[0]["metrics"] == results[1]["metrics"] == {"accuracy": 3.0}
    for step in range(4):
        assert results[0]["steps"][step]["key"] == results[1]["steps"][step]["key"]
        assert {results[0]["steps"][step]["state"], results[1]["steps"][step]["state"]} == {
            "done",
            "cached",
        }
    # Both were recorded in the SQLite MLflow store under storage, with one registered version.
    assert (
        results[0]["registered_model"]["version"]
        == results[1]["registered_model"]["version"]
        == "1"
    )


def test_rich_progress_shows_live_steps_and_a_summary_table(tmp_path):
    from io import StringIO

    from rich.console import Console

    from pipelines.progress import RichReporter

    job = parse_job(job_raw(tmp_path), TABLE)
    screens = []
    for _ in range(2):  # computed, then all cached
        screen = StringIO()
        Runner(
            job,
            RichReporter(Console(file=screen, force_terminal=True, width=120)),
            NullLineage(),
        ).run()
        screens.append(screen.getvalue())
    assert "stage1" in screens[0] and "final_loss=0.3633" in screens[0]
    assert "0/4 steps from cache" in screens[0] and "4/4 steps from cache" in screens[1]


# --- faults: edited inputs, unreadable manifests, failing --force, empty outputs --------------


def test_edited_input_file_recomputes_exactly_what_reads_it(tmp_path):
    source = tmp_path / "rows.txt"
    source.write_text("a\nb\nc\nd\n")
    raw = job_raw(tmp_path / "s", download={"path": str(source)})
    job, first = run(raw)
    assert first.ok, first.error
    download_dir = cache.step_dir(job.storage, "download", first.steps[0].key)
    digest = cache.sha256_file(source)
    assert Manifest.read(download_dir).info["input_files"] == {str(source): digest}
    os.utime(source, ns=(1, 1))  # touched, same bytes: re-hashed once, still the same key
    _, touched = run(raw)
    assert set(states(touched).values()) == {"cached"}
    source.write_text("a\nb\nc\nd\ne\nf\n")  # edited in place
    _, edited = run(raw)
    assert set(states(edited).values()) == {"done"}
    assert edited.steps[0].key != first.steps[0].key
    assert edited.metrics == {"accuracy": 3.0}  # 6 rows, every second kept
    # An edit that leaves the step's output as it was recomputes that step only.
    raw_every = job_raw(tmp_path / "s", download={"path": str(source)}, filter={"keep_every": 9})
    run(raw_every)
    source.write_text("a\nb\nc\nd\ne\nf\n")
    os.utime(source, ns=(2, 2))
    _, same = run(raw_every)
    assert states(same) == {"download": "cached", "filter": "cached", "stage1": "cached",
                            "evaluate": "cached"}  # fmt: skip


def test_input_folder_digest_follows_its_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"one")
    storage = tmp_path / "storage"
    first = cache.input_digests(storage, [str(folder)])
    (folder / "b.png").write_bytes(b"two")
    second = cache.input_digests(storage, [str(folder)])
    (folder / "b.png").write_bytes(b"TWO")
    third = cache.input_digests(storage, [str(folder)])
    assert len({first[str(folder)], second[str(folder)], third[str(folder)]}) == 3
    assert cache.input_paths(
        {"a": [str(folder), "@shapes/x", "s3://b/k", "not-a-path"], "env": {"HOME": str(tmp_path)}}
    ) == [str(folder)]


def test_unreadable_manifest_is_absent_with_a_warning_and_never_blocks(tmp_path, capsys):
    raw = job_raw(tmp_path)
    job, first = run(raw)
    manifest_path = cache.step_dir(job.storage, "filter", first.steps[1].key) / "manifest.json"
    for damage in ("", '{"step": "filter", "files": [{"pa'):
        manifest_path.write_text(damage)
        planned = {p.name: p for p in plan(job, estimate_memory=False)}
        assert not planned["filter"].cached
        assert str(manifest_path) in planned["filter"].problems[0]
        status = job_status(job)
        assert status["steps"][1]["problems"] == planned["filter"].problems
        _, again = run(raw)
        assert again.ok, again.error
        assert states(again) == {"download": "cached", "filter": "done", "stage1": "cached",
                                 "evaluate": "cached"}  # fmt: skip
        assert Manifest.read(manifest_path.parent).key == first.steps[1].key
    # A damaged execution record (a hand edit, a full disk) is skipped, never fatal.
    record = next((job.storage / "executions").glob("*/execution.json"))
    record.write_text('{"execution_id": ')
    next((job.storage / "executions").glob("*/steps/filter.json")).write_text("")
    assert [s["step"] for s in job_status(job)["steps"]] == list(TABLE)


def test_cli_status_and_dry_run_survive_an_empty_manifest(tmp_path, monkeypatch, capsys):
    from pipelines import cli

    raw = job_raw(tmp_path)
    job, first = run(raw)
    manifest_path = cache.step_dir(job.storage, "download", first.steps[0].key) / "manifest.json"
    manifest_path.write_text("")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("OWL_STEPS_TABLE", "tests.integration.fake_steps:TABLE")
    assert cli.main(["status", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert "warning: download:" in out and "unreadable manifest" in out
    assert cli.main(["run", str(job_file), "--dry-run", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [s["cached"] for s in steps] == [False, False, False, False]
    assert "unreadable manifest" in steps[0]["problems"][0]


def test_failing_force_keeps_the_committed_output_and_checkpoints(tmp_path):
    raw = job_raw(tmp_path)
    job, first = run(raw)
    train_dir = cache.step_dir(job.storage, "stage1", first.steps[2].key)
    before = {p.relative_to(train_dir): p.read_bytes() for p in train_dir.rglob("*") if p.is_file()}
    assert Path("checkpoints/step-2.json") in before
    (job.storage / "fail-stage1").write_text("")
    _, forced = run(raw, force=["stage1"])
    assert not forced.ok and "told to fail" in forced.error
    after = {p.relative_to(train_dir): p.read_bytes() for p in train_dir.rglob("*") if p.is_file()}
    assert after == before  # the model, its checkpoints and its manifest are untouched
    assert sorted(p.name for p in train_dir.parent.iterdir()) == [train_dir.name]
    _, again = run(raw)
    assert again.ok and states(again)["stage1"] == "cached"
    (job.storage / "fail-stage1").unlink()
    _, fixed = run(raw, force=["stage1"])
    assert fixed.ok and states(fixed)["stage1"] == "done"
    assert fixed.steps[2].metrics["resumed_from"] == 0.0  # started over, beside the old one
    assert sorted(p.name for p in train_dir.parent.iterdir()) == [train_dir.name]
    old_commit = json.loads(before[Path("manifest.json")])["created_at"]
    assert Manifest.read(train_dir).created_at > old_commit  # the new output, swapped in


def test_empty_output_fails_with_counts_unless_allowed(tmp_path):
    sleeps: list[float] = []
    raw = job_raw(tmp_path, download={"num_rows": 0})
    _, result = run(raw, sleeps)
    assert not result.ok and sleeps == []  # not retried
    assert "step filter kept no samples of 0 read (num_in)" in result.error
    assert "allow_empty: true" in result.error
    raw = job_raw(tmp_path, download={"num_rows": 0}, filter={"allow_empty": True})
    _, allowed = run(raw, until="filter")
    assert allowed.ok, allowed.error


def test_same_size_corruption_is_caught_when_a_computing_step_reads_it(tmp_path):
    job, first = run(job_raw(tmp_path))
    kept = cache.step_dir(job.storage, "filter", first.steps[1].key) / "kept.txt"
    kept.write_text(kept.read_text().replace("row", "ROW"))  # same size, other content
    _, again = run(job_raw(tmp_path))  # nothing computes: sizes only, nothing is hashed
    assert states(again)["filter"] == "cached"
    _, result = run(job_raw(tmp_path, stage1={"num_steps": 4}))
    assert states(result) == {"download": "cached", "filter": "done", "stage1": "done",
                              "evaluate": "done"}  # fmt: skip
    assert "ROW" not in kept.read_text()


def test_what_a_killed_force_run_left_is_removed_by_the_next_run(tmp_path):
    raw = job_raw(tmp_path)
    job, first = run(raw)
    train_dir = cache.step_dir(job.storage, "stage1", first.steps[2].key)
    # What `owl run --force stage1` killed mid-way (kill -9, a lost node) leaves: its build
    # folder beside the output, with checkpoints and no manifest.
    left = train_dir.with_name(f"{train_dir.name}.force-0123abcd")
    (left / "checkpoints").mkdir(parents=True)
    (left / "checkpoints" / "step-0.json").write_text("{}")
    _, again = run(raw)  # a cached run that can take the key's lock removes it
    assert states(again)["stage1"] == "cached"
    assert sorted(p.name for p in train_dir.parent.iterdir()) == [train_dir.name]
    # A forced run removes one (here mid-swap: `.old`) before it builds its own.
    shutil.copytree(train_dir, train_dir.with_name(f"{train_dir.name}.force-4567.old"))
    _, forced = run(raw, force=["stage1"])
    assert forced.ok and states(forced)["stage1"] == "done"
    assert sorted(p.name for p in train_dir.parent.iterdir()) == [train_dir.name]


# What Ray 2.60 raised when a training worker was killed (SIGKILL) as its group started.
WORKER_DIED = """The actor died unexpectedly before finishing this task.
\tclass_name: RayTrainWorker
\tactor_id: 5a5cdcb678366b0a46bc514f01000000
\tpid: 9642
\tnamespace: 6c3887c4-8702-488c-8ec9-4879594efaa2
\tip: 192.0.2.2
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected error. If the process was killed by the kernel OOM killer (verifiable by checking for OOM in dmesg of the OOMing node), consider enabling resource isolation via --enable-resource-isolation to prevent node deaths by resource contention and significant loss of progress by uninformed kernel OOM killing."""  # noqa: E501


def test_an_error_line_leads_with_the_cause_and_ends_on_a_word():
    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError, WorkerGroupError

    from pipelines.errors import error_summary

    died = ActorDiedError()
    died.error_msg = WORKER_DIED
    assert error_summary(ControllerError(died)) == (
        "ControllerError <- ActorDiedError: The actor died unexpectedly before finishing this "
        "task. The actor is dead because its worker process has died. Worker exit type: "
        "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
        "code 2. End of file. Some common causes include …"
    )
    group = WorkerGroupError("rank 1: ...\nrank 0: ...", {1: died, 0: ValueError("bad shard 3")})
    assert error_summary(group) == "WorkerGroupError <- ValueError: bad shard 3"  # lowest rank


def test_a_retry_line_says_what_failed_without_started(tmp_path):
    from io import StringIO

    screen = StringIO()
    job = parse_job(job_raw(tmp_path, download={"fail_times": 1}), TABLE)
    result = Runner(job, Reporter(screen), NullLineage(), sleep=lambda s: None).run()
    assert result.ok
    lines = screen.getvalue().splitlines()
    assert "[owl] download: attempt 1 failed (ConnectionError: flaky source, attempt 1); retry in 0.5s" in lines  # fmt: skip
    assert lines[0] == "[owl] download: started"
    assert not [line for line in lines if "started " in line]
