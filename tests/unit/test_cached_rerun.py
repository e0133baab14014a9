"""A fully cached `owl run` stays cheap and honest (issue 6's benchmark: a cached re-run of the
demo <= 5% of its first run): it imports neither torch, Ray, transformers, DeepSpeed nor
img2dataset, so it starts no Ray; and each hit is still a child run in MLflow that points at the
run that computed the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from owl.data.manifest import FileEntry, Manifest
from pipelines import cache
from pipelines.dag import upstream_of
from pipelines.jobspec import load_job, parse_job
from pipelines.plan import select_steps, step_key
from pipelines.progress import Reporter
from pipelines.runner import Runner
from tests.integration.fake_steps import TABLE, fake_job

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("torch", "ray", "transformers", "deepspeed", "img2dataset", "albumentations")


def _python(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OWL_STEPS_TABLE"}
    env.update({"PYTHONPATH": str(ROOT), **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _owl_run_in_subprocess(argv: list[str], modules_file: Path) -> dict:
    """`owl run ... --json` in a fresh interpreter; writes the heavy modules it had loaded."""
    code = (
        "import json, sys\n"
        "from pipelines import cli\n"
        f"rc = cli.main({argv!r})\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        f"open({str(modules_file)!r}, 'w').write(json.dumps(heavy))\n"
        "sys.exit(rc)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _fake_committed_outputs(job) -> dict[str, Manifest]:
    """A committed output under the real key of every step of `job`, as a finished first run
    leaves them (one small file each): the next `owl run` finds every step cached."""
    manifests: dict[str, Manifest] = {}
    for name in select_steps(job, None):
        spec = job.steps[name].spec
        ups = upstream_of(spec, job.steps)
        key = step_key(job, name, {role: manifests[up].digest for role, up in ups.items()})
        out = cache.step_dir(job.storage, name, key)
        (out / "model").mkdir(parents=True)
        (out / "model" / "out.txt").write_text(f"{name} output\n")
        manifest = Manifest(step=name, stats={"value": float(len(name))})
        manifest.add_file(out, "model/out.txt", rows=1)
        manifest.key, manifest.code_version = key, spec.version
        manifest.write(out)
        manifests[name] = manifest
    return manifests


def test_job_files_validate_without_heavy_imports():
    """Every step module's `Config` (what validation reads) imports without torch, Ray & co."""
    code = (
        "import glob, json, sys\n"
        "from pipelines import cli\n"
        "from pipelines.jobspec import load_job\n"
        "from pipelines.plan import plan\n"
        "cli.build_parser()\n"
        "for path in sorted(glob.glob('jobs/*.yaml')):\n"
        "    plan(load_job(path, ['storage=/nonexistent/owl-test']), estimate_memory=False)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout) == []


def test_cached_rerun_of_the_demo_job_starts_no_ray_and_imports_no_torch(tmp_path):
    storage = tmp_path / "storage"
    job = load_job(ROOT / "jobs" / "demo.yaml", [f"storage={storage}"])
    manifests = _fake_committed_outputs(job)
    modules_file = tmp_path / "modules.json"

    result = _owl_run_in_subprocess(
        ["run", "jobs/demo.yaml", "--set", f"storage={storage}", "--json"], modules_file
    )

    assert result["ok"], result["error"]
    assert [(s["step"], s["state"]) for s in result["steps"]] == [
        (name, "cached") for name in manifests
    ]
    assert [s["key"] for s in result["steps"]] == [m.key for m in manifests.values()]
    assert json.loads(modules_file.read_text()) == []  # hence no Ray was started either
    assert result["registered_model"] == {"name": "demo", "version": "1"}
    # Each hit is a finished child run of the execution's parent run.
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'"
    )
    assert sorted(r.data.tags["owl.step"] for r in children) == sorted(manifests)
    assert {(r.data.tags["owl.cache"], r.info.status) for r in children} == {("hit", "FINISHED")}


def test_a_hit_run_points_at_the_run_that_computed_the_output(tmp_path):
    job = parse_job(fake_job("hits", tmp_path), TABLE)
    first = Runner(job, Reporter(quiet=True)).run()
    second = Runner(job, Reporter(quiet=True)).run()
    assert first.ok and second.ok
    assert {s.state for s in first.steps} == {"done"} and {s.state for s in second.steps} == {
        "cached"
    }

    client = MlflowClient(job.mlflow_uri)

    def step_runs(parent_id: str) -> dict:
        experiment = client.get_run(parent_id).info.experiment_id
        runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")
        return {r.data.tags["owl.step"]: r for r in runs}

    computed, hits = step_runs(first.mlflow_run_id), step_runs(second.mlflow_run_id)
    assert set(hits) == set(computed) == {"download", "filter", "stage1", "evaluate"}
    for name, hit in hits.items():
        producer = computed[name]
        assert hit.info.run_id != producer.info.run_id
        assert hit.info.status == "FINISHED"
        assert hit.data.tags["owl.cache"] == "hit" and producer.data.tags["owl.cache"] == "miss"
        assert hit.data.tags["owl.producer_run_id"] == producer.info.run_id
        assert hit.data.tags["owl.output_digest"] == producer.data.tags["owl.output_digest"]
        assert hit.data.tags["owl.cache_key"] == producer.data.tags["owl.cache_key"]
        assert hit.data.params == producer.data.params
        # The same statistics; the training curve ("loss") is logged by the computing run only.
        curves = {"loss"} if name == "stage1" else set()
        assert hit.data.metrics == {
            k: v for k, v in producer.data.metrics.items() if k not in curves
        }
    # Inputs of a hit name the upstream output and the run that computed it.
    (dataset_input,) = hits["filter"].inputs.dataset_inputs
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert input_tags["owl.producer_run_id"] == computed["download"].info.run_id
    assert input_tags["owl.sha256"] == computed["download"].data.tags["owl.output_digest"]
    # Curves and artifacts stay with the computing run only.
    assert client.get_metric_history(hits["stage1"].info.run_id, "loss") == []
    assert client.list_artifacts(hits["filter"].info.run_id) == []
    # The registered version is the one the first run made; its alias still points at it.
    assert first.registered_model == second.registered_model == {"name": "hits", "version": "1"}
    version = client.get_model_version_by_alias("hits", "current")
    assert str(version.version) == "1"
    assert version.tags["owl.run.stage1"] == computed["stage1"].info.run_id


def test_verify_reports_missing_files_with_one_stat_each(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "d.txt").write_text("not a folder")
    manifest = Manifest(step="s")
    manifest.add_file(tmp_path, "a.txt")
    assert manifest.verify(tmp_path) == []
    manifest.files.append(FileEntry("d.txt/inner.bin", 1, "0" * 64))  # d.txt is a file
    manifest.files.append(FileEntry("gone.bin", 1, "0" * 64))
    (tmp_path / "a.txt").write_text("abcd")
    assert manifest.verify(tmp_path) == [
        "a.txt: size 4 != 3",
        "d.txt/inner.bin: missing",
        "gone.bin: missing",
    ]
