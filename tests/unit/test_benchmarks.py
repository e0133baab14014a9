"""Benchmark reader: every type parses, paths resolve against the file's folder, and a malformed
record is reported with its file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from owl.eval.benchmarks import benchmark_name, read_benchmark
from owl.eval.prompts import CHOICE_INSTRUCTION, VQA_INSTRUCTION, question_text

GOOD = [
    {"id": "v1", "type": "vqa", "images": ["img/a.png"], "question": "What colour?",
     "answers": ["red"] * 10},
    {"id": "c1", "type": "caption", "images": ["img/a.png"], "references": ["a red circle"]},
    {"id": "m1", "type": "multiple_choice", "images": [], "question": "Which?",
     "options": ["x", "y", "z"], "answer": "C", "hint": "Look closely."},
    {"id": "y1", "type": "yes_no", "images": ["img/a.png"], "question": "Is it red?",
     "answer": "yes", "pair_id": "a"},
    {"id": "t1", "type": "text", "images": [], "question": "Capital of France?", "answer": "Paris"},
    {"id": "t2", "type": "text", "question": "2+2?", "options": ["3", "4"], "answer": "B",
     "category": "math"},
]  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    return tmp_path


def test_reads_every_type_and_resolves_images(bench_dir: Path) -> None:
    records = read_benchmark(_write_jsonl(bench_dir / "mixed.jsonl", GOOD))
    assert [r.type for r in records] == [
        "vqa", "caption", "multiple_choice", "yes_no", "text", "text"
    ]  # fmt: skip
    assert records[0].images == (str(bench_dir / "img" / "a.png"),)
    assert len(records[0].answers) == 10
    assert records[2].options == ("x", "y", "z") and records[2].hint == "Look closely."
    assert records[5].extra == {"category": "math"}
    assert records[0].source.endswith("mixed.jsonl:1")


def test_parquet_and_limit(bench_dir: Path) -> None:
    # Columns a row lacks are null in parquet: the reader treats them as absent.
    rows = [{"answers": None, "references": None, **row} for row in GOOD[:2]]
    pq.write_table(pa.Table.from_pylist(rows), bench_dir / "two.parquet")
    records = read_benchmark(bench_dir / "two.parquet")
    assert [r.id for r in records] == ["v1", "c1"]
    assert records[1].references == ("a red circle",)
    assert [r.id for r in read_benchmark(bench_dir / "two.parquet", limit=1)] == ["v1"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({**GOOD[0], "answers": ["red"] * 3}, "'answers' has 3 answers"),
        ({**GOOD[0], "images": ["img/missing.png"]}, "'images'.*missing.png"),
        ({**GOOD[0], "images": []}, "'images' is empty"),
        ({**GOOD[0], "type": "quiz"}, "'type' is 'quiz'"),
        ({**GOOD[0], "question": ""}, "'question' is missing"),
        ({**GOOD[1], "references": []}, "'references'"),
        ({**GOOD[2], "answer": "D"}, "'answer' is 'D'.*'A', 'B', 'C'"),
        ({**GOOD[2], "options": ["x"]}, "'options' needs 2"),
        ({**GOOD[3], "answer": "maybe"}, "'answer' is 'maybe'"),
        ({**GOOD[3], "pair_id": ""}, "'pair_id'"),
        ({**GOOD[4], "answer": ""}, "'answer' is missing"),
        ({**GOOD[4], "id": 7}, "'id' must be a string"),
        ({**GOOD[0], "answers": "red"}, "'answers' must be a list of strings"),
    ],
)
def test_malformed_record_names_file_line_and_field(
    bench_dir: Path, bad: dict, message: str
) -> None:
    path = _write_jsonl(bench_dir / "bad.jsonl", [GOOD[4], GOOD[5], bad])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        read_benchmark(path)


def test_invalid_json_and_duplicate_ids(bench_dir: Path) -> None:
    path = bench_dir / "broken.jsonl"
    path.write_text(json.dumps(GOOD[4]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        read_benchmark(path)
    _write_jsonl(path, [GOOD[4], GOOD[4]])
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: id 't1' already used at .*:1"):
        read_benchmark(path)


def test_parquet_error_names_row(bench_dir: Path) -> None:
    rows = [GOOD[4], {**GOOD[4], "id": "t9", "answer": ""}]
    pq.write_table(pa.Table.from_pylist(rows), bench_dir / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet:row 2: field 'answer'"):
        read_benchmark(bench_dir / "bad.parquet")


def test_benchmark_name() -> None:
    assert benchmark_name("/data/benchmarks/vqa.jsonl") == "vqa"
    assert benchmark_name("textvqa_val.parquet") == "textvqa_val"


def test_prompts_follow_the_authors(bench_dir: Path) -> None:
    records = read_benchmark(_write_jsonl(bench_dir / "mixed.jsonl", GOOD))
    assert question_text(records[0]) == f"What colour? {VQA_INSTRUCTION}"
    assert question_text(records[1]) == "Provide a one-sentence caption for the provided image."
    assert question_text(records[2]) == (
        f"Look closely.\nWhich?\nA. x\nB. y\nC. z\n{CHOICE_INSTRUCTION}"
    )
    assert question_text(records[2], ["z", "x", "y"]).count("A. z") == 1
    assert question_text(records[3]) == "Is it red? Please answer yes or no."
    assert question_text(records[4]) == "Capital of France?"
    assert question_text(records[5]) == f"2+2?\nA. 3\nB. 4\n{CHOICE_INSTRUCTION}"
