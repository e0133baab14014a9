"""Importers of video QA benchmarks: MSRVTT-QA and MSVD-QA (open-ended, exact match)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from owl.data.video import VIDEO_SUFFIXES
from owl.eval.importers.official import Record, _field, _Inputs, _load_json


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
