"""Importers of short-answer and yes/no benchmarks: VQAv2, OK-VQA, TextVQA, VizWiz, GQA, POPE
(open-ended records scored by VQA accuracy or exact match) and MME (yes/no pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl.eval.importers.official import (
    Record,
    _field,
    _find_image,
    _Inputs,
    _json_lines,
    _load_json,
)
from owl.eval.metrics import MME_COGNITION, MME_PERCEPTION

# ---------------------------------------------------------------------------------------------
# VQA family


def _vqa_record(record_id: str, image: str, question: str, rule: str,
                answers: list[str] | None, answer_type: str = "", submission: str = "vqav2",
                **ids: Any) -> Record:  # fmt: skip
    """A short-answer VQA record; `answers` None (a split without public answers) leaves it
    unanswered and marked for `submission`."""
    record: Record = {"id": record_id, "type": "vqa", **ids, "images": [image],
                      "question": question, "rule": rule, "prompt": "short_answer"}  # fmt: skip
    if answers is None:
        record.update(answers=[], submission=submission)
    else:
        record["answers"] = answers
        if answer_type:
            record["answer_type"] = answer_type
    return record


def _vqa_like(inputs: _Inputs, rule: str) -> list[Record]:
    """VQAv2 / OK-VQA: questions JSON + optional annotations JSON + the COCO image folder."""
    questions_file = annotations_file = None
    for path in inputs.files:
        data = _load_json(path)
        if isinstance(data, dict) and "questions" in data:
            questions_file, questions = path, data
        elif isinstance(data, dict) and "annotations" in data:
            annotations_file, annotations = path, data
        else:
            raise ValueError(f"{path}: neither a questions file (key 'questions') nor an "
                             "annotations file (key 'annotations')")  # fmt: skip
    if questions_file is None:
        raise ValueError(f"{inputs.kind}: give the questions JSON (with key 'questions')")
    answers: dict[Any, list[str]] | None = None
    answer_types: dict[Any, str] = {}
    if annotations_file is not None:
        answers = {}
        for n, ann in enumerate(_field(annotations, "annotations", str(annotations_file))):
            where = f"{annotations_file}: annotations[{n}]"
            qid = _field(ann, "question_id", where)
            answers[qid] = [str(_field(a, "answer", where)) for a in _field(ann, "answers", where)]
            if ann.get("answer_type"):
                answer_types[qid] = str(ann["answer_type"])
    subtype = str(questions.get("data_subtype", ""))
    image_subtype = "test2015" if subtype.startswith("test") else subtype  # test-dev2015 too
    folder = inputs.image_dir()
    records = []
    for n, q in enumerate(_field(questions, "questions", str(questions_file))):
        where = f"{questions_file}: questions[{n}]"
        qid = _field(q, "question_id", where)
        image_id = int(_field(q, "image_id", where))
        name = f"COCO_{image_subtype}_{image_id:012d}.jpg"
        image = _find_image(folder, name, where, (image_subtype,))
        question = str(_field(q, "question", where))
        if answers is not None and qid not in answers:
            raise ValueError(f"{where}: question {qid} has no annotation in {annotations_file}")
        records.append(_vqa_record(str(qid), image, question, rule,
                                   None if answers is None else answers[qid],
                                   answer_types.get(qid, ""), question_id=qid,
                                   image_id=image_id))  # fmt: skip
    return records


def import_vqav2(inputs: _Inputs) -> list[Record]:
    return _vqa_like(inputs, "vqav2")


def import_okvqa(inputs: _Inputs) -> list[Record]:
    return _vqa_like(inputs, "vqav2")  # OK-VQA is scored with the VQAv2 script


def import_textvqa(inputs: _Inputs) -> list[Record]:
    """TextVQA_0.5.1_{val,test}.json ({"data": [...]}) + the train_images/ or test_images/ folder."""
    path, data, folder = inputs.json_and_images("TextVQA JSON")
    records = []
    for n, row in enumerate(_field(data, "data", str(path))):
        where = f"{path}: data[{n}]"
        qid = _field(row, "question_id", where)
        image = _find_image(folder, str(_field(row, "image_id", where)), where)
        question = str(_field(row, "question", where))
        answers = [str(a) for a in row["answers"]] if row.get("answers") else None
        # A split without answers is submitted in VQAv2's format (EvalAI takes the same list).
        records.append(_vqa_record(str(qid), image, question, "vqav2", answers, question_id=qid))
    return records


def import_vizwiz(inputs: _Inputs) -> list[Record]:
    """VizWiz-VQA val.json / test.json (a list) + its image folder."""
    path, rows, folder = inputs.json_and_images("VizWiz JSON")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a VizWiz annotation file is a JSON list")
    records = []
    for n, row in enumerate(rows):
        where = f"{path}[{n}]"
        image = str(_field(row, "image", where))
        found = _find_image(folder, image, where)
        question = str(_field(row, "question", where))
        answers = None
        if row.get("answers"):
            answers = [str(_field(a, "answer", where)) for a in row["answers"]]
        records.append(_vqa_record(Path(image).stem, found, question, "vizwiz", answers,
                                   str(row.get("answer_type") or ""), "vizwiz",
                                   image_name=image))  # fmt: skip
    return records


def import_gqa(inputs: _Inputs) -> list[Record]:
    """GQA balanced questions JSON ({question id: {imageId, question, answer, ...}}) + images/."""
    path, data, folder = inputs.json_and_images("GQA questions JSON")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: GQA questions are a JSON object keyed by question id")
    records = []
    for qid, row in data.items():
        where = f"{path}: question {qid}"
        records.append({
            "id": str(qid), "type": "text", "question_id": str(qid),
            "images": [_find_image(folder, str(_field(row, "imageId", where)), where)],
            "question": str(_field(row, "question", where)),
            "answer": str(_field(row, "answer", where)), "rule": "gqa", "prompt": "short_answer",
        })  # fmt: skip
    return records


def import_pope(inputs: _Inputs) -> list[Record]:
    """POPE question file (JSON lines: question_id, image, text, label) + the COCO val2014 folder."""
    path = inputs.one_file("POPE question file")
    folder = inputs.image_dir()
    records = []
    for n, row in enumerate(_json_lines(path), start=1):
        where = f"{path}:{n}"
        qid = _field(row, "question_id", where)
        label = str(_field(row, "label", where)).strip().lower()
        records.append({
            "id": str(qid), "type": "yes_no", "question_id": qid, "pair_id": str(qid),
            "images": [_find_image(folder, str(_field(row, "image", where)), where)],
            "question": str(_field(row, "text", where)), "answer": label, "rule": "pope",
            "prompt": "short_answer",
        })  # fmt: skip
    return records


# ---------------------------------------------------------------------------------------------
# Yes/no: MME


def import_mme(inputs: _Inputs) -> list[Record]:
    """The MME_Benchmark_release_version folder: one folder per subtask; in it the images and,
    per image, a .txt of "question<TAB>answer" lines (artwork, celebrity, landmark, posters and
    scene keep them in images/ and questions_answers_YN/)."""
    root = inputs.image_dir()
    records = []
    for category in MME_PERCEPTION + MME_COGNITION:
        folder = root / category
        if not folder.is_dir():
            continue
        image_dir, text_dir = folder, folder
        if (folder / "questions_answers_YN").is_dir():
            image_dir, text_dir = folder / "images", folder / "questions_answers_YN"
        for text_file in sorted(text_dir.glob("*.txt")):
            image = _find_image(image_dir, text_file.stem, str(text_file))
            lines = [x for x in text_file.read_text(encoding="utf-8").splitlines() if x.strip()]
            for n, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{text_file}:{n + 1}: expected 'question<TAB>Yes|No'")
                records.append({
                    "id": f"{category}/{text_file.stem}/{n}", "type": "yes_no",
                    "images": [image], "question": parts[0].strip(),
                    "answer": parts[1].strip().lower(),
                    "pair_id": f"{category}/{Path(image).name}", "category": category,
                    "rule": "mme", "prompt": "mme",
                })  # fmt: skip
    if not records:
        raise ValueError(f"{root}: no MME subtask folder ({', '.join(MME_PERCEPTION)}, ...)")
    return records
