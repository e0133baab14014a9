"""Submission files for splits without public answers, in the format each server takes.

- VQAv2 test-dev / test-std (EvalAI): a JSON list `[{"question_id": int, "answer": str}, ...]`
  with every question of the split once;
- VizWiz test (EvalAI): `[{"image": "VizWiz_test_00000000.jpg", "answer": str}, ...]`;
- MMBench test: the upload sheet (.xlsx), one row per TSV row: index, question, A..D (E when the
  sheet has it), prediction (the model's reply as generated; the server extracts the letter).

The importers record which format a record belongs to in its `submission` field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from owl.eval.benchmarks import BenchmarkRecord, is_unanswered
from owl.eval.metrics import LETTERS

SUBMISSION_FORMATS = ("vqav2", "vizwiz", "mmbench")
SUFFIX = {"vqav2": ".json", "vizwiz": ".json", "mmbench": ".xlsx"}


def submission_format(records: Sequence[BenchmarkRecord]) -> str | None:
    """The submission format of a benchmark without public answers, None for a scored one."""
    if not records or not all(is_unanswered(r) for r in records):
        return None
    formats = {str(r.extra.get("submission", "")) for r in records}
    if len(formats) != 1 or not formats <= set(SUBMISSION_FORMATS):
        raise ValueError(
            f"{records[0].source}: a benchmark without answers needs field 'submission' (one of "
            f"{SUBMISSION_FORMATS}) on every record, to know which upload file to write"
        )
    return formats.pop()


def write_submission(
    path: Path,
    fmt: str,
    records: Sequence[BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
) -> Path:
    """Write the upload file for `fmt` to `path` (its suffix is set by the format)."""
    path = path.with_suffix(SUFFIX[fmt])
    path.parent.mkdir(parents=True, exist_ok=True)
    by_id = {r.id: r for r in records}
    first = {}
    for prediction in predictions:
        if int(prediction.get("shift", 0)) == 0:
            first.setdefault(prediction["id"], prediction["prediction"])
    missing = [r.id for r in records if r.id not in first]
    if missing:
        raise ValueError(f"submission: no prediction for {len(missing)} record(s): {missing[:3]}")
    if fmt == "vqav2":
        rows: Any = [{"question_id": _official_id(by_id[i]), "answer": first[i]} for i in by_id]
        path.write_text(json.dumps(rows))
    elif fmt == "vizwiz":
        rows = [{"image": str(by_id[i].extra["image_name"]), "answer": first[i]} for i in by_id]
        path.write_text(json.dumps(rows))
    else:
        _write_mmbench_sheet(path, [(by_id[i], first[i]) for i in by_id])
    return path


def _official_id(record: BenchmarkRecord) -> Any:
    return record.extra.get("question_id", record.id)


def _write_mmbench_sheet(path: Path, rows: Sequence[tuple[BenchmarkRecord, str]]) -> None:
    from openpyxl import Workbook

    num_letters = max(4, max(len(r.options) for r, _ in rows))
    letters = list(LETTERS[:num_letters])
    book = Workbook()
    sheet = book.active
    sheet.append(["index", "question", *letters, "prediction"])
    for record, prediction in rows:
        options = [
            record.options[i] if i < len(record.options) else None for i in range(len(letters))
        ]
        sheet.append([_official_id(record), record.question, *options, prediction])
    book.save(path)
