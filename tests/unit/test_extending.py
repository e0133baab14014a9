"""docs/extending.md stays true: each "Files:" line names files that exist and hold the symbol
named beside them, at most two per section (the model variant's excepted, as the page says), and
the two registrations it describes work as written (a kind added to `KINDS` is importable by
spec; the filter step's `Config` takes every `FilterRules` field)."""

from __future__ import annotations

import dataclasses
import json
import re
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
        if "model variant" not in title:
            assert len(named) <= 2, f"{title}: {len(named)} files"
        for path, symbol in named:
            if "<name>" in path:  # the new step's own module
                continue
            source = (ROOT / path).read_text()
            assert re.search(rf"^(class |def )?{symbol}\b", source, re.M), f"{path}: {symbol}"


def test_a_kind_added_to_kinds_is_imported_by_spec(tmp_path: Path, monkeypatch) -> None:
    from owl.eval import importers

    def import_toy(inputs):
        rows = json.loads(inputs.one_file("questions").read_text())
        return [importers._vqa_record(str(r["id"]), "", r["q"], "vqav2", r["a"]) for r in rows]

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
