"""Benchmark files: one record per item, JSONL or parquet, validated per type on reading.

The format is documented in docs/benchmarks.md. A malformed record raises ValueError naming the
file, the line (JSONL) or row (parquet), and the field, so the file can be fixed by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from owl.eval.metrics import LETTERS

BenchmarkType = Literal["vqa", "caption", "multiple_choice", "yes_no", "text"]
BENCHMARK_TYPES: tuple[str, ...] = ("vqa", "caption", "multiple_choice", "yes_no", "text")
NUM_VQA_ANSWERS = 10
_NEEDS_IMAGE = frozenset({"vqa", "caption", "yes_no"})


@dataclass(frozen=True)
class BenchmarkRecord:
    """One benchmark item. `images` and `videos` are absolute paths (a video is asked as its
    sampled frames, after the images: owl.data.video); unused fields keep their defaults."""

    id: str
    type: BenchmarkType
    source: str  # "<file>:<line>" (JSONL) or "<file>:row <n>" (parquet), for error messages
    images: tuple[str, ...] = ()
    question: str = ""
    answers: tuple[str, ...] = ()  # vqa: the ten human answers
    references: tuple[str, ...] = ()  # caption: reference captions
    options: tuple[str, ...] = ()  # multiple_choice (and optionally text): option texts
    answer: str = ""  # letter (multiple_choice, text with options), "yes"/"no", or reference
    hint: str = ""  # multiple_choice: context shown before the question
    pair_id: str = ""  # yes_no: questions about one image share it (accuracy+)
    # Scoring rule (RULES[type] below); "" = the type's default (vqa: the run's rule).
    rule: str = ""
    # Prompt style (owl.eval.prompts.PROMPTS); "" = the type's own prompt (the demo's).
    prompt: str = ""
    # multiple_choice: rows that are rotations of one question (MMBench's circular copies) share
    # it, with `extra["circular_shift"]` telling which rotation; "" = the record alone.
    group: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # other fields, kept, not scored
    videos: tuple[str, ...] = ()


def benchmark_name(path: str | os.PathLike) -> str:
    """The name metrics are reported under: the file name without its extension."""
    return Path(path).name.split(".")[0]


def read_benchmark(path: str | os.PathLike, limit: int | None = None) -> list[BenchmarkRecord]:
    """All records of a `.jsonl` or `.parquet` benchmark file (the first `limit` if given)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: benchmark file not found")
    if path.suffix == ".jsonl":
        raw = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        raw = _parquet_rows(path)
    else:
        raise ValueError(f"{path}: benchmark files are .jsonl or .parquet, got {path.suffix!r}")
    records: list[BenchmarkRecord] = []
    seen: dict[str, str] = {}
    for where, row in raw:
        if limit is not None and len(records) >= limit:
            break
        record = parse_record(row, where, path.parent)
        if record.id in seen:
            raise ValueError(f"{where}: id {record.id!r} already used at {seen[record.id]}")
        seen[record.id] = where
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    unanswered = [r for r in records if is_unanswered(r)]
    if unanswered and len(unanswered) != len(records):
        raise ValueError(
            f"{unanswered[0].source}: no answer, while other records of {path} have one; a file "
            "is either scored (every record answered) or a submission split (none answered)"
        )
    return records


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for row_number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        # Parquet fills absent fields with None: drop them so defaults apply.
        yield f"{path}:row {row_number}", {k: v for k, v in row.items() if v is not None}


def parse_record(row: Any, where: str, base_dir: Path) -> BenchmarkRecord:
    """Validate one raw record (a dict) and resolve its image paths against `base_dir`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a record is a JSON object, got {type(row).__name__}")
    record_type = _string(row, "type", where, required=True)
    if record_type not in BENCHMARK_TYPES:
        raise ValueError(f"{where}: field 'type' is {record_type!r}; use one of {BENCHMARK_TYPES}")
    images = tuple(_media_path(p, where, base_dir) for p in _strings(row, "images", where))
    videos = tuple(
        _media_path(p, where, base_dir, "videos") for p in _strings(row, "videos", where)
    )
    if record_type in _NEEDS_IMAGE and not images and not videos:
        raise ValueError(
            f"{where}: field 'images' is empty (and no 'videos'); a {record_type} record needs "
            "an image or a video"
        )
    known = {f for f in BenchmarkRecord.__dataclass_fields__ if f not in ("source", "extra")}
    record = BenchmarkRecord(
        id=_string(row, "id", where, required=True),
        type=record_type,  # type: ignore[arg-type]
        source=where,
        images=images,
        question=_string(row, "question", where, required=record_type != "caption"),
        answers=tuple(_strings(row, "answers", where)),
        references=tuple(_strings(row, "references", where)),
        options=tuple(_strings(row, "options", where)),
        answer=_string(row, "answer", where),
        hint=_string(row, "hint", where),
        pair_id=_string(row, "pair_id", where),
        rule=_string(row, "rule", where),
        prompt=_string(row, "prompt", where),
        group=_string(row, "group", where),
        extra={k: v for k, v in row.items() if k not in known},
        videos=videos,
    )
    _check_rule(record, where)
    _CHECKS[record_type](record, where)
    return record


# Scoring rules a record may name, per type (docs/benchmarks.md "Scoring"); "" is the default.
RULES: dict[str, tuple[str, ...]] = {
    "vqa": ("", "vqav2", "vizwiz", "normalized"),
    "caption": ("",),
    "multiple_choice": ("", "circular", "single"),
    "yes_no": ("", "mme", "pope"),
    "text": ("", "gqa"),
}


def _check_rule(record: BenchmarkRecord, where: str) -> None:
    if record.rule not in RULES[record.type]:
        valid = [r for r in RULES[record.type] if r]
        raise ValueError(
            f"{where}: field 'rule' is {record.rule!r}; a {record.type} record takes one of {valid}"
        )
    categories = record.extra.get("categories")
    if categories is not None and (
        not isinstance(categories, list)
        or not all(isinstance(c, str) and c.strip() for c in categories)
    ):
        raise ValueError(f"{where}: field 'categories' must be a list of non-empty strings")
    if record.rule == "mme" and not isinstance(record.extra.get("category"), str):
        raise ValueError(f"{where}: an MME record needs its subtask in field 'category'")


def is_unanswered(record: BenchmarkRecord) -> bool:
    """A record of a split without public answers (VQAv2 test-dev, MMBench test): it is asked
    and its prediction goes to the submission file, but it is not scored."""
    return (record.type == "vqa" and not record.answers) or (
        record.type == "multiple_choice" and not record.answer
    )


def _string(row: dict, name: str, where: str, required: bool = False) -> str:
    value = row.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{where}: field {name!r} is missing or empty")
    return value


def _strings(row: dict, name: str, where: str) -> list[str]:
    value = row.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {name!r} must be a list of strings")
    return value


def _media_path(path: str, where: str, base_dir: Path, name: str = "images") -> str:
    full = Path(path) if os.path.isabs(path) else base_dir / path
    if not full.is_file():
        raise ValueError(f"{where}: field {name!r}: {path!r} not found (looked at {full})")
    return str(full)


def _check_answer_letter(record: BenchmarkRecord, where: str) -> None:
    if not 2 <= len(record.options) <= len(LETTERS):
        raise ValueError(f"{where}: field 'options' needs 2 to {len(LETTERS)} options")
    if record.type == "multiple_choice" and not record.answer:
        return  # a split without public answers: predictions go to the submission file
    valid = LETTERS[: len(record.options)]
    if len(record.answer) != 1 or record.answer not in valid:
        raise ValueError(
            f"{where}: field 'answer' is {record.answer!r}; give the correct option's letter, "
            f"one of {list(valid)}"
        )


def _check_vqa(record: BenchmarkRecord, where: str) -> None:
    if not record.answers:
        return  # a split without public answers (VQAv2 test-dev): submission file only
    if len(record.answers) != NUM_VQA_ANSWERS:
        raise ValueError(
            f"{where}: field 'answers' has {len(record.answers)} answers; VQA accuracy needs the "
            f"{NUM_VQA_ANSWERS} human answers (for one reference answer use type 'text'; none for "
            "a split without public answers)"
        )


def _check_caption(record: BenchmarkRecord, where: str) -> None:
    if not any(r.strip() for r in record.references):
        raise ValueError(f"{where}: field 'references' needs at least one reference caption")


def _check_yes_no(record: BenchmarkRecord, where: str) -> None:
    if record.answer not in ("yes", "no"):
        raise ValueError(f"{where}: field 'answer' is {record.answer!r}; use 'yes' or 'no'")
    if not record.pair_id:
        raise ValueError(f"{where}: field 'pair_id' is missing; questions about one image share it")


def _check_text(record: BenchmarkRecord, where: str) -> None:
    if record.options:
        _check_answer_letter(record, where)
    elif not record.answer.strip():
        raise ValueError(f"{where}: field 'answer' is missing; give the reference answer")


_CHECKS = {
    "vqa": _check_vqa,
    "caption": _check_caption,
    "multiple_choice": _check_answer_letter,
    "yes_no": _check_yes_no,
    "text": _check_text,
}
