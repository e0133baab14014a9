"""Reading a benchmark's official files: the paths of one import by role (`_Inputs`), JSON and
JSON-lines files with errors that name the file and line, required fields, image files by name.
Shared by the importers of every family (owl.eval.importers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


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
