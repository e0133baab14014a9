"""Job files: validation errors that name the field, --set overrides, and every job in jobs/
planning with --dry-run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.jobspec import apply_override, load_job, parse_job
from pipelines.ray_jobs import submission_base_id
from tests.integration.fake_steps import TABLE

ROOT = Path(__file__).resolve().parents[2]

JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))


def raw_job(tmp_path: Path) -> dict:
    return {
        "name": "t",
        "storage": str(tmp_path / "s"),
        "model": {"name": "debug-tiny", "variant": "owl2"},
        "download": {"num_rows": 3},
        "filter": {},
        "stage1": {"num_steps": 2},
    }


def error_of(raw: dict) -> str:
    with pytest.raises(ValueError) as info:
        parse_job(raw, TABLE)
    return str(info.value)


def test_valid_job_is_typed_and_defaulted(tmp_path):
    job = parse_job(raw_job(tmp_path), TABLE)
    assert job.step_names() == ["download", "filter", "stage1"]
    assert job.steps["stage1"].config.stage == 1  # fixed by the DAG
    assert job.steps["download"].retries.max_retries == 2
    assert job.storage == (tmp_path / "s").resolve()
    assert job.mlflow_uri == f"sqlite:///{job.storage}/mlflow.db"
    assert job.mlflow_artifacts == str(job.storage / "mlartifacts")
    assert job.owl_config.variant == "owl2"


@pytest.mark.parametrize(
    ("uri", "artifacts_under_storage"),
    [("sqlite:///{tmp}/elsewhere.db", True), ("postgresql+psycopg2://db/owl", True),
     ("http://mlflow:5000", False)],
)  # fmt: skip
def test_a_database_store_keeps_artifacts_under_storage(tmp_path, monkeypatch, uri, artifacts_under_storage):  # fmt: skip
    """Under a database store MLflow puts a new experiment's artifacts in ./mlruns of the folder
    owl runs in (MLFLOW_TRACKING_URI=sqlite:///... wrote the mlruns/ once committed here); a
    server keeps them where it was told to."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    job = parse_job(raw_job(tmp_path), TABLE)
    expected = str(job.storage / "mlartifacts") if artifacts_under_storage else None
    assert job.mlflow_artifacts == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown job field(s) ['colour']"),
        (
            {"filter": {"keep_evry": 2}},
            "filter: unknown field(s) ['keep_evry']; allowed: ['keep_every', 'sleep_s']",
        ),
        ({"stage1": {"num_steps": "ten"}}, "stage1.num_steps: expected int, got str 'ten'"),
        ({"stage1": {"num_steps": True}}, "stage1.num_steps: expected int, got bool True"),
        ({"stage1": {"stage": 2}}, "stage1.stage: is fixed to 1"),
        (
            {"model": {"name": "debug-tiny", "variant": "owl3"}},
            "model.variant: 'owl3' is not allowed; expected one of ['owl1', 'owl2']",
        ),
        ({"model": {"name": "no-such-size"}}, "unknown model config 'no-such-size'"),
        ({"download": {"retry": {"max_retries": "x"}}}, "download.retry.max_retries: expected int"),
        ({"download": {"resources": {"gpus": 1}}}, "download.resources: unknown field(s) ['gpus']"),
        ({"storage": "s3://bucket/owl"}, "storage: 's3://bucket/owl': only local paths"),
        ({"seed": 1.5}, "seed: expected int, got float 1.5"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(tmp_path, change, message):
    raw = {**raw_job(tmp_path), **change}
    assert message in error_of(raw)


def test_a_union_error_says_the_value_once():
    from owl.configs import coerce

    with pytest.raises(ValueError) as info:
        coerce([1], int | str, "x")
    assert str(info.value) == "x: [1] matches none of: expected int, got list [1]; expected str, got list [1]"  # fmt: skip


def test_missing_upstream_and_role_paths_are_errors(tmp_path):
    raw = raw_job(tmp_path)
    del raw["filter"]
    assert "stage1: needs step 'filter' (input 'data'); add a `filter:` section" in error_of(raw)
    raw = raw_job(tmp_path)
    raw["download"] = {"prefix": "@shapes/captions.parquet"}
    assert "download.prefix: '@shapes/captions.parquet' names input 'shapes'" in error_of(raw)


def test_overrides_are_yaml_values_at_any_path(tmp_path):
    raw = raw_job(tmp_path)
    for item in ["storage=/tmp/elsewhere", "stage1.num_steps=10", "model.variant=owl1",
                 "model.overrides.decoder.num_layers=1", "evaluate={}"]:  # fmt: skip
        apply_override(raw, item)
    job = parse_job(raw, TABLE)
    assert str(job.storage) == "/tmp/elsewhere"
    assert job.steps["stage1"].config.num_steps == 10
    assert job.owl_config.variant == "owl1" and job.owl_config.decoder.num_layers == 1
    assert "evaluate" in job.steps
    with pytest.raises(ValueError, match="stage1.num_steps is a int, not a section"):
        apply_override(raw, "stage1.num_steps.x=1")
    with pytest.raises(ValueError, match="expected PATH=VALUE"):
        apply_override(raw, "stage1.num_steps")


def test_submission_id_is_deterministic_per_job_and_overrides(tmp_path):
    raw = raw_job(tmp_path)
    same = yaml.safe_load(yaml.safe_dump(raw))
    assert submission_base_id(raw) == submission_base_id(same)
    apply_override(same, "stage1.num_steps=3")
    assert submission_base_id(raw) != submission_base_id(same)


@pytest.mark.parametrize("job_file", JOB_FILES, ids=[p.stem for p in JOB_FILES])
def test_every_job_file_validates_and_plans(job_file, tmp_path, capfd):
    code = cli.main(["run", str(job_file), "--dry-run", "--json", "--set", f"storage={tmp_path}"])
    out, err = capfd.readouterr()
    assert code == 0, err
    planned = json.loads(out)["steps"]
    job = load_job(job_file, [f"storage={tmp_path}"])
    assert [p["name"] for p in planned] == job.step_names()
    assert planned[0]["key"] and not planned[0]["cached"]
    assert not any(Path(tmp_path).iterdir())  # a dry run writes nothing
    training = [p for p in planned if p["name"] in ("stage1", "stage2")]
    assert training and all(p["memory_gib"] > 0 for p in training)


def test_jobs_directory_has_the_three_recipes():
    assert {p.stem for p in JOB_FILES} >= {"demo", "owl1-llama-7b", "owl2-llama2-7b"}


def test_yaml_syntax_errors_are_one_line_errors_with_their_position(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(
        'name: x\nstorage: /tmp/x\nshapes: {}\ndownload:\n  url_list: "a\n  timeout: 3\n'
    )
    assert cli.main(["run", str(job), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {job}: not valid YAML: line 7, column 1: found unexpected end")
    assert "quoted scalar that starts at line 5, column 13" in err and "Traceback" not in err
    job.write_text("name: x\nstorage: /tmp/x\nshapes:\n  num_eval: 1\n bad: 2\n")
    assert cli.main(["status", str(job)]) == 2
    assert "line 5, column 2: expected <block end>" in capsys.readouterr().err
    job.write_text("name: x\nstorage: /tmp/x\nshapes: {}\n")
    assert cli.main(["run", str(job), "--dry-run", "--set", "shapes={num_eval: [1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --set 'shapes={num_eval: [1': the value is not valid YAML: line 1"
    )


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"download": {"distributor": "rayy"}}, "download.distributor: 'rayy' is not allowed"),
        ({"download": {"resize_mode": "crop"}}, "download.resize_mode: 'crop' is not allowed"),
        ({"download": {"input_format": "xlsx"}}, "download.input_format: 'xlsx' is not allowed"),
        (
            {"tokenize_instructions": {"sources": [{"format": "lava", "path": "x.json"}]}},
            "tokenize_instructions.sources[0].format: 'lava' is not allowed; expected one of "
            "['llava', 'alpaca', 'sharegpt']",
        ),
    ],
)
def test_enumerated_fields_are_checked_at_validation(section, expected):
    raw = {"name": "x", "storage": "/tmp/x", "shapes": {}, "download": {}, "filter": {},
           "tokenizer": {}, **section}  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_job(raw)
