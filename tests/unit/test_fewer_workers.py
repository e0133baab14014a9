"""The job-file policy when the cluster offers fewer workers (`fewer_workers`, `min_workers`):
what Ray Train is asked for, what the cluster must have, and that the documented commands keep
the training steps' cache keys (so the stage resumes its own checkpoints)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from owl.train.config import TrainConfig
from pipelines import cli
from pipelines.dag import upstream_of
from pipelines.jobspec import load_job
from pipelines.plan import step_key
from pipelines.steps._ray_train import check_resources, scaling_workers

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "pipeline.md", ROOT / "infra" / "README.md"]


def test_continue_asks_ray_train_for_an_elastic_range() -> None:
    assert scaling_workers(TrainConfig().replace(resources={"num_workers": 8})) == 8
    assert (
        scaling_workers(TrainConfig().replace(resources={"num_workers": 8, "min_workers": 4})) == 8
    )  # wait: fixed
    cfg = TrainConfig().replace(
        resources={"num_workers": 8, "fewer_workers": "continue", "min_workers": 4}
    )
    assert scaling_workers(cfg) == (4, 8)
    assert scaling_workers(cfg.replace(resources={"min_workers": 8})) == 8


def test_continue_needs_only_min_workers_resources(monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    cfg = TrainConfig().replace(resources={"num_workers": 4, "cpus_per_worker": 1})
    with pytest.raises(ValueError, match="4 workers x 1 CPU = 4 CPUs, but the Ray cluster has 3"):
        check_resources(cfg)
    check_resources(cfg.replace(resources={"fewer_workers": "continue", "min_workers": 3}))
    with pytest.raises(ValueError, match="4 workers x 1 CPU = 4 CPUs, but the Ray cluster has 3"):
        check_resources(cfg.replace(resources={"fewer_workers": "continue", "min_workers": 4}))


def _documented() -> list[str]:
    lines = [line for doc in DOCS for line in doc.read_text().splitlines()]
    return [line for line in lines if line.startswith("owl run") and "fewer_workers" in line]


@pytest.mark.parametrize("command", _documented())
def test_documented_resume_on_fewer_workers_keeps_the_cache_keys(command, tmp_path, capfd) -> None:
    """The commands docs/pipeline.md and infra/README.md show: they plan (run with --dry-run),
    and their training steps' keys equal the job's own, so they resume its checkpoints."""
    argv = shlex.split(command)
    assert argv[:2] == ["owl", "run"]
    storage = ["--set", f"storage={tmp_path}"]
    assert cli.main(argv[1:] + ["--dry-run", *storage]) == 0
    capfd.readouterr()
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    changed = load_job(argv[2], overrides + [f"storage={tmp_path}"])
    original = load_job(argv[2], [f"storage={tmp_path}"])
    stage = overrides[0].split(".")[0]
    assert changed.steps[stage].config.resources.fewer_workers == "continue"
    assert original.steps[stage].config.resources.fewer_workers == "wait"
    digests = {role: "0" * 64 for role in upstream_of(changed.steps[stage].spec, changed.steps)}
    assert step_key(changed, stage, digests, {}) == step_key(original, stage, digests, {})
    other = load_job(argv[2], [f"{stage}.resources.num_workers=1", f"storage={tmp_path}"])
    assert step_key(other, stage, digests, {}) != step_key(original, stage, digests, {})
