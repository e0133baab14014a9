"""Importers of multiple-choice benchmarks: ScienceQA, SEED-Bench, MMBench (its TSV, images decoded
from base64, circular copies grouped).
"""

from __future__ import annotations

import base64
import csv
import sys
from pathlib import Path
from typing import Any

from owl.eval.importers.official import Record, _field, _find_image, _Inputs
from owl.eval.metrics import LETTERS

MMBENCH_COPY = 1_000_000  # MMBench/VLMEvalKit: a circular copy's index = main index + k * 1e6


def _choice_record(qid: Any, images: list[str], question: str, options: list[str], answer: str,
                   prompt: str, hint: str = "", **extra: Any) -> Record:  # fmt: skip
    return {"id": str(qid), "type": "multiple_choice", "question_id": qid, "images": images,
            "question": question, "options": options, "answer": answer, "hint": hint,
            "rule": "single", "prompt": prompt, **extra}  # fmt: skip


# ScienceQA's own scorer (tools/evaluate_acc.py in lupantech/ScienceQA) reports accuracy by
# subject, by context modality (text context = a non-empty hint, image, neither) and by grade
# group; `categories` carries the groups a problem counts in, under that scorer's names.
SCIENCEQA_SUBJECTS = {"natural science": "natural", "social science": "social",
                      "language science": "language"}  # fmt: skip


def scienceqa_categories(row: dict[str, Any]) -> list[str]:
    """The official scorer's groups of one problems.json row: natural / social / language,
    has_text / has_image / no_context, grade_1_6 / grade_7_12 (a field it lacks: no group)."""
    categories = []
    subject = SCIENCEQA_SUBJECTS.get(str(row.get("subject", "")).strip().lower())
    if subject:
        categories.append(subject)
    if row.get("hint"):
        categories.append("has_text")
    if row.get("image"):
        categories.append("has_image")
    if not row.get("hint") and not row.get("image"):
        categories.append("no_context")
    grade = str(row.get("grade", "")).strip().lower()
    if grade.startswith("grade") and grade[5:].isdigit() and 1 <= int(grade[5:]) <= 12:
        categories.append("grade_1_6" if int(grade[5:]) <= 6 else "grade_7_12")
    return categories


def import_scienceqa(inputs: _Inputs) -> list[Record]:
    """ScienceQA problems.json + its image folder (<split>/<pid>/image.png): the test problems
    that have an image (ScienceQA-IMG), each with the official scorer's groups (`categories`)
    and its `subject` and `grade`."""
    path, data, folder = inputs.json_and_images("ScienceQA problems.json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: ScienceQA problems are a JSON object keyed by problem id")
    records = []
    for pid, row in data.items():
        where = f"{path}: problem {pid}"
        if _field(row, "split", where) != "test" or not row.get("image"):
            continue
        choices = [str(c) for c in _field(row, "choices", where)]
        answer = int(_field(row, "answer", where))
        image = _find_image(folder, f"{pid}/{row['image']}", where, ("test",))
        records.append(_choice_record(pid, [image], str(_field(row, "question", where)), choices,
                                      LETTERS[answer], "scienceqa", str(row.get("hint") or ""),
                                      subject=str(row.get("subject", "")),
                                      grade=str(row.get("grade", "")),
                                      categories=scienceqa_categories(row)))  # fmt: skip
    if not records:
        raise ValueError(f"{path}: no test problem with an image (ScienceQA-IMG is empty)")
    return records


# SEED-Bench's image dimensions by question_type_id, as its paper names them; the JSON's own
# `question_type` map ({"Scene Understanding": 1, ...}) takes precedence when present.
SEED_DIMENSIONS = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes",
                   4: "Instance Location", 5: "Instance Counting", 6: "Spatial Relation",
                   7: "Instance Interaction", 8: "Visual Reasoning", 9: "Text Recognition"}  # fmt: skip


def import_seed(inputs: _Inputs) -> list[Record]:
    """SEED-Bench.json ({"questions": [...], "question_type": {name: id}}) + SEED-Bench-image/:
    the image questions. SEED's eval.py reports accuracy per question_type_id (dimension): each
    record's `categories` is its dimension's name (`dimension_<id>` for an unknown id)."""
    path, data, folder = inputs.json_and_images("SEED-Bench JSON")
    names = dict(SEED_DIMENSIONS)
    if isinstance(data, dict) and isinstance(data.get("question_type"), dict):
        names.update({int(i): str(n) for n, i in data["question_type"].items()})
    records = []
    for n, row in enumerate(_field(data, "questions", str(path))):
        where = f"{path}: questions[{n}]"
        if row.get("data_type", "image") != "image":
            continue  # video questions need frames, not one image
        options = [str(_field(row, f"choice_{x}", where)) for x in "abcd"]
        answer = str(_field(row, "answer", where)).strip()
        image = _find_image(folder, str(_field(row, "data_id", where)), where)
        type_id = _field(row, "question_type_id", where)
        if not str(type_id).strip().isdigit():
            raise ValueError(f"{where}: question_type_id {type_id!r} is not a number")
        dimension = names.get(int(type_id), f"dimension_{type_id}")
        records.append(_choice_record(_field(row, "question_id", where), [image],
                                      str(_field(row, "question", where)), options, answer,
                                      "seed", question_type_id=type_id, dimension=dimension,
                                      categories=[dimension]))  # fmt: skip
    return records


def _missing(value: str) -> bool:
    return value.strip() in ("", "nan", "NaN", "None")


def import_mmbench(inputs: _Inputs, out_dir: Path, name: str) -> list[Record]:
    """MMBench TSV (index, question, hint, A..D[E], answer [absent on test], category, image as
    base64 [or the index of a row with the same image]). Rows whose group (VLMEvalKit: the
    `g_index` column, else index % 1e6) is another row are circular copies of it: each is asked
    as given and a question counts only if all its copies are right. Without copies we rotate
    the options ourselves."""
    path = inputs.one_file("MMBench TSV")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for column in ("index", "question", "A", "B", "image"):
        if column not in rows[0]:
            raise ValueError(f"{path}: column {column!r} missing (is this MMBench's TSV?)")
    image_dir = out_dir / f"{name}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    by_index = {int(r["index"]): r for r in rows}

    def group_of(row: dict) -> int:  # VLMEvalKit: a `g_index` column, else index % 1e6
        g_index = (row.get("g_index") or "").strip()
        return int(float(g_index)) if g_index else int(row["index"]) % MMBENCH_COPY

    has_copies = any(group_of(r) != i for i, r in by_index.items())
    copies: dict[int, int] = {}  # copies seen per group: each gets its own rotation number
    records = []
    for number, row in enumerate(rows, start=2):
        where = f"{path}:{number}"
        index = int(row["index"])
        image = _mmbench_image(row, by_index, image_dir, where)
        options = []
        for letter in LETTERS[:5]:
            value = row.get(letter) or ""
            if _missing(value):
                break
            options.append(value)
        answer = (row.get("answer") or "").strip()
        record = _choice_record(
            index, [image], row["question"], options, "" if _missing(answer) else answer,
            "mmbench", "" if _missing(row.get("hint") or "") else row["hint"],
            category=row.get("category", ""), l2_category=row.get("l2-category", ""),
            categories=[c for c in (row.get("category"), row.get("l2-category"))
                        if c and not _missing(c)],  # scored per each, as VLMEvalKit reports
        )  # fmt: skip
        if has_copies:
            group = group_of(row)
            copies[group] = copies.get(group, 0) + (group != index)
            record.update(group=str(group), circular_shift=copies[group] if group != index else 0)
        else:
            record["rule"] = ""  # rotated by us unless the run turns circular evaluation off
        if not record["answer"]:
            record["submission"] = "mmbench"
        records.append(record)
    return records


def _mmbench_image(row: dict, by_index: dict[int, dict], image_dir: Path, where: str) -> str:
    value = row["image"].strip()
    if value.isdigit() and int(value) in by_index:  # a row sharing another row's image
        value = by_index[int(value)]["image"].strip()
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{where}: column 'image' is not base64 image data") from None
    suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    out = image_dir / f"{int(row['index'])}{suffix}"
    out.write_bytes(data)
    return str(out.resolve())
