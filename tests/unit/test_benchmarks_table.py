"""BENCHMARKS.md opens with the table of current numbers, and its commands stay true: every
`bench/` script it names exists and declares each flag the command passes, every `make` target
is in the Makefile and every test file exists. Read from the files only (no script is run: the
benchmarks take minutes)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table_rows() -> list[list[str]]:
    text = (ROOT / "BENCHMARKS.md").read_text()
    section = text.split("## Current numbers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_the_table_comes_first_and_names_a_command_for_each_benchmark() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Current numbers"
    rows = _table_rows()
    assert len(rows) >= 20
    for benchmark, current, target, command, section in rows:
        assert current and target, benchmark
        assert command.startswith("`") or command == "same run", benchmark
        titles = re.findall(r"^#{2,3} (.+)$", text, re.M)
        assert any(t.startswith(section) for t in titles), f"{benchmark}: no section {section!r}"


def test_the_tables_commands_exist_with_their_flags() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for benchmark, _, _, command, _ in _table_rows():
        if command == "same run":
            continue
        words = command.strip("`").split()
        if words[0].startswith("bench/"):
            source = (ROOT / words[0]).read_text()
            for flag in (w for w in words if w.startswith("--")):
                assert f'"{flag}"' in source, f"{benchmark}: {words[0]} has no {flag}"
        elif words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), benchmark
        elif words[0] == "pytest":
            assert (ROOT / words[-1]).is_file(), benchmark
        else:
            assert words[:2] == ["owl", "run"] and (ROOT / words[2]).is_file(), benchmark
