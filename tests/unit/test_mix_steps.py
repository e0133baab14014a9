"""A training stage's `mix` naming steps of its job: the named step becomes an input of the stage
(role `mix:<step>`), so its manifest digest is in the stage's cache key, `--until` runs it and
`--force` of it re-runs the stage; the stage reads that step's output as a mix dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_packing import mixed_samples, write_shards

from owl.train.config import TrainConfig
from pipelines.dag import upstream_of
from pipelines.jobspec import parse_job
from pipelines.plan import forced_steps, select_steps, step_key
from pipelines.step import StepInput
from pipelines.steps.train import mixed_shards

ROOT = Path(__file__).resolve().parents[2]


def demo(tmp_path: Path, mix: dict | None = None, stage: str = "stage2") -> dict:
    raw = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    raw["storage"] = str(tmp_path / "s")
    if mix is not None:
        raw[stage]["data"] = {"mix": mix}
    return raw


def test_a_mixed_step_is_an_input_of_the_stage_and_in_its_key(tmp_path):
    plain, mixed = parse_job(demo(tmp_path)), parse_job(demo(tmp_path, {"tokenize_captions": 0.5}))
    ups = upstream_of(mixed.steps["stage2"].spec, mixed.steps)
    assert ups == {**upstream_of(plain.steps["stage2"].spec, plain.steps),
                   "mix:tokenize_captions": "tokenize_captions"}  # fmt: skip
    digests = {role: f"digest-of-{up}" for role, up in ups.items()}
    edited = {**digests, "mix:tokenize_captions": "another digest"}
    assert step_key(mixed, "stage2", digests, {}) != step_key(mixed, "stage2", edited, {})
    # Only the stage that names it gets the role.
    assert "mix:tokenize_captions" not in mixed.steps["stage1"].spec.roles


def test_force_and_until_follow_the_mix(tmp_path):
    """Stage 1 does not read tokenize_instructions, unless its mix names it."""
    plain = parse_job(demo(tmp_path))
    mixed = parse_job(demo(tmp_path, {"tokenize_instructions": 0.1}, stage="stage1"))
    assert "stage1" in forced_steps(mixed, ["tokenize_instructions"])
    assert "stage1" not in forced_steps(plain, ["tokenize_instructions"])
    assert "tokenize_instructions" in select_steps(mixed, "stage1")
    assert "tokenize_instructions" not in select_steps(plain, "stage1")


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"tokenize_caption": 1.0}, r"stage2.data.mix.tokenize_caption: names no step of this job"),
        ({"evaluate": 1.0}, r"stage2.data.mix.evaluate: a step after stage2"),
    ],
)
def test_mix_names_an_earlier_step_of_the_job(tmp_path, mix, message):
    with pytest.raises(ValueError, match=message):
        parse_job(demo(tmp_path, mix))


def test_the_stage_reads_the_mixed_step_output(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    data_manifest = write_shards(data, mixed_samples(12), per_shard=6)
    other_manifest = write_shards(other, mixed_samples(8), per_shard=4)
    other_manifest.write(other)
    inputs = {
        "data": StepInput("tokenize_instructions", data, data_manifest),
        "mix:tokenize_captions": StepInput("tokenize_captions", other, other_manifest),
    }
    cfg = TrainConfig(stage=2).replace(
        schedule={"max_steps": 1}, data={"mix": {"tokenize_captions": 0.25}, "data_weight": 0.75}
    )
    from owl.data.loader import shards_from_manifest
    from owl.model import get_config
    from owl.train.data_plan import plan_data

    shards = shards_from_manifest(data_manifest, data)
    plan = plan_data(cfg, get_config("debug-tiny"), shards, mixed_shards(cfg, inputs))
    assert [(d.name, d.weight, sum(s.rows for s in d.shards)) for d in plan.datasets] == [
        ("data", 0.75, 12),
        ("tokenize_captions", 0.25, 8),
    ]


def test_the_model_card_lists_each_mixed_dataset_with_its_counts(tmp_path):
    """A mixed step that no other step reads (tokenize_text) is a row of the card's data table:
    its step, rows, tokens, shards and digest, as the stage recorded them (mixed_summaries)."""
    from owl.data.manifest import Manifest
    from pipelines.steps.export import _data_section
    from pipelines.steps.train import mixed_summaries

    data, text = tmp_path / "data", tmp_path / "text"
    data_manifest = write_shards(data, mixed_samples(12), per_shard=6)
    text_manifest = write_shards(text, mixed_samples(8), per_shard=4)
    text_manifest.write(text)
    inputs = {
        "data": StepInput("tokenize_instructions", data, data_manifest),
        "mix:tokenize_text": StepInput("tokenize_text", text, text_manifest),
    }
    cfg = TrainConfig(stage=2).replace(data={"mix": {"tokenize_text": 1.0}})
    summaries = mixed_summaries(cfg, inputs)
    assert summaries["tokenize_text"]["step"] == "tokenize_text"
    assert summaries["tokenize_text"]["rows"] == 8 and summaries["tokenize_text"]["shards"] == 2
    assert summaries["tokenize_text"]["digest"] == text_manifest.digest
    assert mixed_summaries(TrainConfig(stage=2), inputs) == {}

    stage2 = Manifest(step="stage2")
    stage2.info = {"mixture": {n: {"weight": 1.0, "drawn": 5, **e} for n, e in summaries.items()}}
    card = _data_section({
        "instructions": inputs["data"], "stage2": StepInput("stage2", tmp_path, stage2),
    })  # fmt: skip
    tokens = summaries["tokenize_text"]["tokens"]
    row = f"| stage2 mix: tokenize_text | tokenize_text | 8 | {tokens:,} | 2 | `{text_manifest.digest[:16]}` |"
    assert row in card, card
    assert card.count("tokenize_instructions") == 1  # the instructions input, listed once


def test_a_mix_folder_given_by_path_is_content_keyed(tmp_path):
    from pipelines.cache import input_paths

    folder = tmp_path / "tok-extra"
    folder.mkdir()
    cfg = TrainConfig(stage=2).replace(
        schedule={"max_steps": 1}, data={"mix": {str(folder): 1.0, "@data/x": 1.0}}
    )
    assert input_paths(cfg) == [str(folder)]


def test_the_model_card_shows_each_stage_mixture(tmp_path):
    from owl.data.manifest import Manifest
    from pipelines.steps.export import _mixture_section

    def stage(mix: dict, data_weight: float, drawn: dict | None = None) -> StepInput:
        manifest = Manifest(step="stage2")
        manifest.info = {"train_config": {"data": {"mix": mix, "data_weight": data_weight}}}
        if drawn:
            manifest.info["mixture"] = {n: {"weight": 0, "drawn": c} for n, c in drawn.items()}
        return StepInput("stage2", tmp_path, manifest)

    drawn = {"data": 2970, "tokenize_captions": 1030}
    card = _mixture_section(
        {"stage1": stage({}, 1.0), "stage2": stage({"tokenize_captions": 1}, 3, drawn)}
    )
    assert "| stage2 | data | 3 | 75.0% | 2,970 | 74.2% |" in card
    assert "| stage2 | tokenize_captions | 1 | 25.0% | 1,030 | 25.8% |" in card
    assert "stage1" not in card
    assert _mixture_section({"stage1": stage({}, 1.0)}) == ""


def test_owl_status_shows_the_mixture(tmp_path, capsys):
    from pipelines import cli

    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(demo(tmp_path, {"tokenize_captions": 1.0})))
    assert cli.main(["status", str(job_file), "--set", "stage2.data.data_weight=3", "--json"]) == 0
    steps = {s["step"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert steps["stage2"]["mixture"] == {"data": 3.0, "tokenize_captions": 1.0}
    assert steps["stage1"]["mixture"] == {}
    assert cli.main(["status", str(job_file), "--set", "stage2.data.data_weight=3"]) == 0
    assert "mixture stage2: data 3 (75%), tokenize_captions 1 (25%)" in capsys.readouterr().out


def with_text_step(tmp_path: Path, **section) -> dict:
    """The demo job with a second tokenize_instructions step, `tokenize_text`, over a text-only
    Alpaca file of its own, drawn 1:3 with stage 2's `data` input."""
    text = tmp_path / "text.json"
    if not text.exists():
        text.write_text(json.dumps([{"instruction": "Say red.", "input": "", "output": "red"}]))
    raw = demo(tmp_path, {"tokenize_text": 1.0})
    raw["stage2"]["data"]["data_weight"] = 3.0
    raw["tokenize_text"] = {
        "kind": "tokenize_instructions",
        "max_length": 256,
        "sources": [{"format": "alpaca", "path": str(text)}],
        **section,
    }
    return raw


def test_a_second_step_of_a_kind_runs_under_its_own_name(tmp_path):
    from pipelines.plan import input_files

    job = parse_job(with_text_step(tmp_path))
    names = list(job.steps)
    assert names.index("tokenize_text") == names.index("tokenize_instructions") + 1
    text, instructions = job.steps["tokenize_text"], job.steps["tokenize_instructions"]
    assert text.spec.roles == instructions.spec.roles  # the kind's inputs
    assert text.spec.module == instructions.spec.module and text.config.max_length == 256
    ups = upstream_of(job.steps["stage2"].spec, job.steps)
    assert ups["mix:tokenize_text"] == "tokenize_text"
    # Its key is its own (its name, its config, its files): an edit to its source moves it ...
    digests = {"tokenizer": "t"}
    before = step_key(job, "tokenize_text", digests)
    assert before != step_key(job, "tokenize_instructions", digests)
    (tmp_path / "text.json").write_text("[]")
    assert step_key(job, "tokenize_text", digests) != before
    assert any(path.endswith("text.json") for path in input_files(job, "tokenize_text"))
    # ... and the stage's key follows either dataset's output digest.
    base = {role: f"digest-of-{up}" for role, up in ups.items()}
    key = step_key(job, "stage2", base, {})
    for role in ("data", "mix:tokenize_text"):
        assert step_key(job, "stage2", {**base, role: "edited"}, {}) != key
    assert "tokenize_text" in select_steps(job, "stage2")
    assert "stage2" in forced_steps(job, ["tokenize_text"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenize_text": {"max_length": 256}}, r"unknown job field\(s\) \['tokenize_text'\]"),
        ({"tokenize_text": {"kind": "stage2"}}, r"tokenize_text.kind: 'stage2' is not a step a job"),
        ({"Text-2": {"kind": "tokenize_instructions"}}, r"Text-2: a step's name is lower-case"),
        ({"tokenize_captions": {"kind": "tokenize_instructions"}}, r"tokenize_captions.kind: "),
        ({"tokenize_text": {"kind": "tokenize_instructions", "max_length": "long"}},
         r"tokenize_text.max_length: expected int"),
    ],
)  # fmt: skip
def test_a_second_step_of_a_kind_names_the_field_it_gets_wrong(tmp_path, change, message):
    raw = with_text_step(tmp_path)
    del raw["tokenize_text"]
    raw["stage2"]["data"]["mix"] = {}
    for name, section in change.items():
        raw[name] = {**raw.get(name, {}), **section}
    with pytest.raises(ValueError, match=message):
        parse_job(raw)


def test_owl_status_shows_the_samples_a_stage_drew(tmp_path, capsys, monkeypatch):
    """Beside the configured weights, the samples of each dataset the committed stage trained on
    (its manifest's `mixture`, as the training step writes it)."""
    from owl.data.manifest import Manifest
    from pipelines import cli, status
    from pipelines.cache import step_dir

    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(with_text_step(tmp_path)))
    manifest = Manifest(step="stage2")
    manifest.info["mixture"] = {"data": {"weight": 3.0, "drawn": 2160},
                                "tokenize_text": {"weight": 1.0, "drawn": 720}}  # fmt: skip
    out = step_dir(tmp_path / "s", "stage2", "k")
    out.mkdir(parents=True)
    manifest.write(out)
    plan = status.plan

    def stage2_committed(job, *args, **kwargs):
        planned = plan(job, *args, **kwargs)
        for p in planned:
            if p.name == "stage2":
                p.key, p.cached = "k", True
        return planned

    monkeypatch.setattr(status, "plan", stage2_committed)
    assert cli.main(["status", str(job_file), "--json"]) == 0
    steps = {s["step"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert steps["stage2"]["drawn"] == {"data": 2160, "tokenize_text": 720}
    assert steps["tokenize_text"]["drawn"] == steps["stage1"]["drawn"] == {}
    assert cli.main(["status", str(job_file)]) == 0
    assert (
        "mixture stage2: data 3 (75%), tokenize_text 1 (25%); "
        "samples drawn: data 2,160 (75%), tokenize_text 720 (25%)"
    ) in capsys.readouterr().out


def test_the_documented_mixture_command_runs_as_written(tmp_path, capsys, monkeypatch):
    """docs/pipeline.md's `owl status` of a 7B recipe, run as written: it prints the line the doc
    shows beside it (the recipe's stage-2 weights)."""
    import re
    import shlex

    from pipelines import cli

    doc = (ROOT / "docs" / "pipeline.md").read_text()
    command, shown = re.search(
        r"\n\s*(owl status jobs/owl1-llama-7b.yaml)\s+# (mixture .*)", doc
    ).groups()
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(shlex.split(command)[1:]) == 0
    assert shown in capsys.readouterr().out
