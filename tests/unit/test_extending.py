"""docs/extending.md stays true: each "Files:" line names files that exist and hold the symbol
named beside them, at most two per section, and the registrations it describes work as written
(a kind added to `KINDS` is importable by spec; the filter step's `Config` takes every
`FilterRules` field; the model variant of its example, added to a scratch copy of the code,
is taken by a job, the template, the stages, the CLI and the release export)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "extending.md"


def _sections() -> dict[str, str]:
    parts = re.split(r"^## ", PAGE.read_text(), flags=re.M)[1:]
    return {part.splitlines()[0]: part for part in parts}


def test_each_section_names_existing_files_and_symbols() -> None:
    sections = _sections()
    assert len(sections) == 4
    for title, body in sections.items():
        files_line = next(line for line in body.splitlines() if line.startswith("Files:"))
        named = re.findall(r"`([\w/<>.]+\.py)` \(`(\w+)`", files_line)
        assert named, title
        assert len(named) <= 2, f"{title}: {len(named)} files"
        for path, symbol in named:
            if "<name>" in path:  # the new step's own module
                continue
            source = (ROOT / path).read_text()
            assert re.search(rf"^(class |def )?{symbol}\b", source, re.M), f"{path}: {symbol}"


def test_a_kind_added_to_kinds_is_imported_by_spec(tmp_path: Path, monkeypatch) -> None:
    from owl.eval import importers
    from owl.eval.importers.vqa import _vqa_record

    def import_toy(inputs):
        rows = json.loads(inputs.one_file("questions").read_text())
        return [_vqa_record(str(r["id"]), "", r["q"], "vqav2", r["a"]) for r in rows]

    monkeypatch.setitem(importers.KINDS, "toy", import_toy)
    questions = tmp_path / "toy.json"
    questions.write_text(json.dumps([{"id": 1, "q": "What?", "a": ["this"]}]))
    name, kind, paths = importers.parse_spec(f"mine=toy:{questions}")
    written = importers.import_benchmark(kind, paths, tmp_path / "out", name)
    assert written.name == "mine.jsonl" and "What?" in written.read_text()


def test_the_filter_step_takes_every_filter_rule() -> None:
    from owl.data.filters import FilterRules
    from pipelines.steps import filter as filter_step

    rules = {f.name for f in dataclasses.fields(FilterRules)}
    assert rules <= {f.name for f in dataclasses.fields(filter_step.Config)}


# Run in the scratch copy with the page's variant added: every place that reads the variant.
_VARIANT_CHECK = """
import contextlib, io, json
from pathlib import Path

import torch

from owl.configs import build_dataclass
from owl.data.templates import Turn, conversation_pieces, get_template, render
from owl.model import OwlModel, get_config, load_model, save_model
from owl.model.releases import convert_release, export_release
from owl.train.stages import trainable_groups
from pipelines.cli import main
from pipelines.jobspec import ModelSpec, resolve_model

spec = build_dataclass(ModelSpec, {"name": "debug-tiny", "variant": "owl2_lora",
                                   "pretrained": {"owl2_lora": ""}}, "model")
cfg = resolve_model(spec)
assert (cfg.variant, cfg.image_placeholder, cfg.decoder.modality_adaptive) == (
    "owl2_lora", "<|image|>", True)
turns = [Turn("user", "<image> What is it?"), Turn("assistant", "A cat.")]
text = render(conversation_pieces(turns, get_template("owl2_lora"), for_prompt=False),
              get_template("owl2_lora"))
assert text == "<s>You are a helpful assistant. USER: <|image|> What is it? ASSISTANT: A cat.</s>", text
for stage, groups in ((1, {"vision", "abstractor", "decoder_visual"}), (2, {"lora"})):
    assert trainable_groups("owl2_lora", stage, train_abstractor_in_stage2=False) == groups
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(["model", "summary", "debug-tiny", "--variant", "owl2_lora", "--json"]) == 0
assert json.loads(out.getvalue())["variant"] == "owl2_lora"
model = OwlModel(get_config("debug-tiny", "owl2_lora", abstractor={"norm_eps": 1e-5}))
save_model(model, "ours")
export_release("ours", "release")
assert json.loads(Path("release/config.json").read_text())["model_type"] == "mplug_owl2"
back, state = convert_release("release", None, "owl2_lora", base="debug-tiny")
assert back.variant == "owl2_lora"
assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
print("variant ok")
"""


def test_the_documented_model_variant_works_when_added(tmp_path: Path) -> None:
    block = re.search(r"```python\n(.*?)```", _sections()["... a model variant"], re.S)
    assert block, "the model variant section has no python block"
    scratch = tmp_path / "code"
    for package in ("owl", "pipelines"):
        shutil.copytree(ROOT / package, scratch / package, ignore=shutil.ignore_patterns("*.pyc"))
    variants = scratch / "owl" / "model" / "variants.py"
    source = variants.read_text()
    # The block's last line is the new `VARIANTS` line; it replaces the one there.
    old = re.findall(r"^VARIANTS: .*$", source, re.M)
    assert len(old) == 1, old
    variants.write_text(source.replace(old[0], block.group(1).strip()))
    env = {**os.environ, "PYTHONPATH": str(scratch)}
    result = subprocess.run(
        [sys.executable, "-c", _VARIANT_CHECK],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "variant ok" in result.stdout
