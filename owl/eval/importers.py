"""Importers: the official files of each benchmark -> one benchmark file of ours (JSONL).

`import_benchmark(kind, paths, out_dir)` reads the files a user downloaded from the benchmark's
owners (their schema, untouched), keeps the official question ids (`id`, and `question_id` as
the owners type it), sets each record's scoring rule and prompt style, and writes
`<out_dir>/<name>.jsonl` whose image paths point at the user's image folder (MMBench ships its
images inside the TSV: they are decoded into `<out_dir>/<name>_images/`). Splits without public
answers (VQAv2 test-dev, MMBench test, VizWiz test) are imported without answers and marked with
their submission format (owl.eval.submissions).

A spec string names an import in one token, as `owl eval --benchmark` and the evaluate step take
it: `[name=]kind:path,path,...`, e.g. `vqav2:questions.json,annotations.json,images/`.
docs/benchmarks.md lists each kind's files.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from owl.data.video import VIDEO_SUFFIXES
from owl.eval.metrics import LETTERS, MME_COGNITION, MME_PERCEPTION

Record = dict[str, Any]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
MMBENCH_COPY = 1_000_000  # MMBench/VLMEvalKit: a circular copy's index = main index + k * 1e6


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _json_lines(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return _load_json(path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    return rows


def _field(row: Any, name: str, where: str) -> Any:
    if not isinstance(row, dict) or name not in row:
        raise ValueError(f"{where}: field {name!r} missing (is this the official file?)")
    return row[name]


class _Inputs:
    """The paths of one import: files by their role, folders (images) in order."""

    def __init__(self, kind: str, paths: Iterable[str | os.PathLike]) -> None:
        self.kind = kind
        self.files: list[Path] = []
        self.dirs: list[Path] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                self.dirs.append(path)
            elif path.is_file():
                self.files.append(path)
            else:
                raise ValueError(f"{kind}: {path} not found")

    def image_dir(self) -> Path:
        if len(self.dirs) != 1:
            raise ValueError(f"{self.kind}: give exactly one image folder, got {len(self.dirs)}")
        return self.dirs[0]

    def one_file(self, what: str) -> Path:
        if len(self.files) != 1:
            raise ValueError(f"{self.kind}: give exactly one {what}, got {len(self.files)} files")
        return self.files[0]

    def json_and_images(self, what: str) -> tuple[Path, Any, Path]:
        """The one JSON file (`what`), its content, and the one image folder."""
        path = self.one_file(what)
        folder = self.image_dir()
        return path, _load_json(path), folder


def _find_image(folder: Path, name: str, where: str, subdirs: Iterable[str] = ()) -> str:
    """`name` (with or without a suffix) in `folder` or one of its `subdirs`: absolute path."""
    candidates = []
    for base in (folder, *(folder / s for s in subdirs)):
        candidates.append(base / name)
        if not Path(name).suffix:
            candidates.extend(base / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    raise ValueError(f"{where}: image {name!r} not found in {folder}")


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
# Multiple choice


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


# ---------------------------------------------------------------------------------------------
# Captions


def _captions(inputs: _Inputs, split: str = "test") -> list[Record]:
    """Karpathy's dataset_{coco,flickr30k}.json (the `split` images) or a COCO-format caption
    file ({"images": [{id, file_name}], "annotations": [{image_id, caption}]}, e.g. NoCaps)."""
    path, data, folder = inputs.json_and_images("caption annotation JSON")
    images = _field(data, "images", str(path))
    records = []
    if "annotations" in data:  # COCO format
        references: dict[Any, list[str]] = {}
        for n, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{n}]"
            references.setdefault(_field(ann, "image_id", where), []).append(
                str(_field(ann, "caption", where))
            )
        for n, image in enumerate(images):
            where = f"{path}: images[{n}]"
            image_id = _field(image, "id", where)
            file_name = str(image.get("file_name") or _field(image, "image", where))
            records.append(_caption_record(image_id, _find_image(folder, file_name, where),
                                           references.get(image_id, []), where))  # fmt: skip
        return records
    for n, image in enumerate(images):  # Karpathy format
        where = f"{path}: images[{n}]"
        if _field(image, "split", where) != split:
            continue
        file_name = str(_field(image, "filename", where))
        sub = str(image.get("filepath", ""))
        image_id = image.get("cocoid", Path(file_name).stem)
        refs = [str(_field(s, "raw", where)) for s in _field(image, "sentences", where)]
        found = _find_image(folder, file_name, where, (sub,) if sub else ())
        records.append(_caption_record(image_id, found, refs, where))
    if not records:
        raise ValueError(f"{path}: no image with split {split!r}")
    return records


def _caption_record(image_id: Any, image: str, references: list[str], where: str) -> Record:
    if not references:
        raise ValueError(f"{where}: image {image_id} has no reference caption")
    return {"id": str(image_id), "type": "caption", "image_id": image_id, "images": [image],
            "references": references, "prompt": "coco_caption"}  # fmt: skip


def import_coco_karpathy(inputs: _Inputs) -> list[Record]:
    return _captions(inputs)


def import_flickr30k(inputs: _Inputs) -> list[Record]:
    return _captions(inputs)


def import_nocaps(inputs: _Inputs) -> list[Record]:
    return _captions(inputs)


# ---------------------------------------------------------------------------------------------
# Video QA: MSRVTT-QA and MSVD-QA (Xu et al. 2017, xudejing/video-question-answering)


def _video_qa(inputs: _Inputs, video_of: Callable[[Any, str], str]) -> list[Record]:
    """A `{train,val,test}_qa.json` list ({id, video_id, question, answer[, category_id]}) as
    open-ended records scored by exact match after normalisation (type text); `video_of(video_id,
    where)` finds the video file."""
    path = next((p for p in inputs.files if p.suffix == ".json"), None)
    if path is None:
        raise ValueError(f"{inputs.kind}: give the QA JSON (e.g. test_qa.json)")
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a {inputs.kind} QA file is a JSON list")
    records = []
    for n, row in enumerate(rows):
        where = f"{path}[{n}]"
        qid, video_id = _field(row, "id", where), _field(row, "video_id", where)
        record = {"id": str(qid), "type": "text", "question_id": qid, "video_id": video_id,
                  "videos": [video_of(video_id, where)],
                  "question": str(_field(row, "question", where)),
                  "answer": str(_field(row, "answer", where)), "prompt": "short_answer"}  # fmt: skip
        if "category_id" in row:
            record["category_id"] = row["category_id"]
        records.append(record)
    return records


def _find_video(folder: Path, stem: str, where: str) -> str:
    for suffix in VIDEO_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return str(candidate.resolve())
    raise ValueError(f"{where}: video {stem!r} ({'/'.join(VIDEO_SUFFIXES)}) not found in {folder}")


def import_msrvtt_qa(inputs: _Inputs) -> list[Record]:
    """MSRVTT-QA test_qa.json (or val/train) + the MSR-VTT video folder (video<id>.mp4)."""
    folder = inputs.image_dir()
    return _video_qa(inputs, lambda video_id, where: _find_video(folder, f"video{video_id}", where))


def import_msvd_qa(inputs: _Inputs) -> list[Record]:
    """MSVD-QA test_qa.json (or val/train) + youtube_mapping.txt (lines "<clip> vid<id>") + the
    MSVD YouTubeClips folder (<clip>.avi)."""
    folder = inputs.image_dir()
    mapping_file = next((p for p in inputs.files if p.suffix == ".txt"), None)
    if mapping_file is None:
        raise ValueError("msvd_qa: give youtube_mapping.txt (lines '<clip name> vid<N>')")
    clips: dict[str, str] = {}
    for number, line in enumerate(mapping_file.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise ValueError(f"{mapping_file}:{number}: expected '<clip name> vid<N>'")
        clips[parts[1][3:]] = parts[0]

    def video_of(video_id: Any, where: str) -> str:
        clip = clips.get(str(video_id))
        if clip is None:
            raise ValueError(f"{where}: video_id {video_id} is not in {mapping_file}")
        return _find_video(folder, clip, where)

    return _video_qa(inputs, video_of)


# ---------------------------------------------------------------------------------------------

KINDS: dict[str, Callable[..., list[Record]]] = {
    "vqav2": import_vqav2,
    "okvqa": import_okvqa,
    "gqa": import_gqa,
    "textvqa": import_textvqa,
    "vizwiz": import_vizwiz,
    "scienceqa": import_scienceqa,
    "coco_karpathy": import_coco_karpathy,
    "flickr30k": import_flickr30k,
    "nocaps": import_nocaps,
    "mmbench": import_mmbench,
    "mme": import_mme,
    "pope": import_pope,
    "seed": import_seed,
    "msrvtt_qa": import_msrvtt_qa,
    "msvd_qa": import_msvd_qa,
}


# The kinds whose records are captions (scored by the COCO caption toolkit: PTB tokenizer, Java).
CAPTION_KINDS = frozenset({"coco_karpathy", "flickr30k", "nocaps"})


def import_benchmark(
    kind: str, paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, name: str = ""
) -> Path:
    """Import the official files `paths` of benchmark `kind`; returns the JSONL file written."""
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; use one of {sorted(KINDS)}")
    name = name or kind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _Inputs(kind, paths)
    if kind == "mmbench":
        records = import_mmbench(inputs, out, name)
    else:
        records = KINDS[kind](inputs)
    if not records:
        raise ValueError(f"{kind}: the files hold no question")
    target = out / f"{name}.jsonl"
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(target)
    return target


def parse_spec(spec: str) -> tuple[str, str, list[str]] | None:
    """`[name=]kind:path,path,...` -> (name, kind, paths); None when `spec` is a plain path."""
    head, sep, tail = spec.partition(":")
    name, _, kind = head.rpartition("=")
    if not sep or kind not in KINDS or "/" in head:
        return None
    paths = [p for p in tail.split(",") if p]
    if not paths:
        raise ValueError(f"benchmark spec {spec!r}: list the official files after '{kind}:'")
    return name or kind, kind, paths
