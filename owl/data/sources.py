"""Readers for instruction data in the formats users bring.

- `llava`: LLaVA / mPLUG-Owl2 JSON: `{"id", "image": path | [paths], "conversations":
  [{"from": "human"|"gpt", "value": "<image>\\n..."}]}`; images relative to `image_folder`
  (default: the JSON file's folder), or absolute paths / filesystem URIs inside it. An image path
  that leaves that root (`../x.jpg`, `/etc/hostname`) is a `Bad("image_outside_root")`; the check
  is on the path as written, so symlinks placed inside the root (a linked `coco/`) are followed.
  Videos the same way: `"video": path | [paths]` (mp4, webm, ...), one `<video>` / `<|video|>`
  placeholder each (`owl.data.video`); a path outside the root is `Bad("video_outside_root")`.
- `alpaca`: `{"instruction", "input", "output"}`, text only; a null `input` is empty, a null
  `instruction` or `output` is a `Bad("missing_field")` (never the text "None").
- `sharegpt`: ShareGPT / Vicuna `{"id", "conversations": [{"from": "human"|"gpt", "value"}]}`.

A file is either a JSON array (`.json`, parsed incrementally) or one JSON object per line
(`.jsonl`, read line by line): a file is streamed, never loaded whole. Readers yield a
`Record` per usable sample and a `Bad(reason, source)` per unusable one (malformed line, unknown
speaker, missing field, a NUL character in a text: `nul_character`) so the caller counts it; a
file that cannot be read at all, or whose first record lacks the format's fields, raises ValueError naming the file and field before any work.
A file (and its image folder) may be an object-store URI (`s3://...`, see `owl.data.uri`),
streamed from there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import ijson

from owl.configs import INPUT_PATH
from owl.data import uri
from owl.data.templates import Turn

SourceFormat = Literal["llava", "alpaca", "sharegpt"]
FORMATS: tuple[str, ...] = ("llava", "alpaca", "sharegpt")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "llava": ("conversations",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class SourceSpec:
    format: SourceFormat  # checked when a job file is validated (a Literal)
    path: str = field(metadata=INPUT_PATH)
    image_folder: str | None = field(default=None, metadata=INPUT_PATH)


@dataclass
class Record:
    sample_id: str
    turns: list[Turn]
    images: list[str] = field(default_factory=list)  # resolved paths or URIs, in order
    source: str = ""  # file:index, for lineage
    videos: list[str] = field(default_factory=list)  # resolved paths or URIs, in order


@dataclass(frozen=True)
class Bad:
    reason: str
    source: str


def _open_binary(path: str | Path) -> contextlib.AbstractContextManager[BinaryIO]:
    if uri.is_uri(str(path)):
        filesystem, inner = uri.resolve(str(path))
        return filesystem.open_input_stream(inner)  # type: ignore[return-value]
    return open(path, "rb")


def _iter_json_objects(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(index, object) pairs, streamed: a `.json` array is parsed incrementally (ijson) and a
    `.jsonl` file read line by line, so a file is never held in memory whole. A malformed JSONL
    line yields (index, None); an unreadable or malformed `.json` raises ValueError (possibly
    after earlier records were yielded: the error names the file)."""
    try:
        if str(path).endswith(".jsonl"):
            with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
                for index, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        yield index, json.loads(line)
                    except json.JSONDecodeError:
                        yield index, None
            return
        with _open_binary(path) as f:
            first = _first_byte(f)
            if first != b"[":
                what = {b"{": "an object", b"": "an empty file"}.get(first, "a single value")
                raise ValueError(f"{path}: expected a JSON array of samples, got {what}")
        with _open_binary(path) as f:  # again from the start (object streams do not seek)
            # use_float: numbers as float, as json.load gives them (ijson's default is Decimal)
            yield from enumerate(ijson.items(f, "item", use_float=True))
    except (OSError, UnicodeDecodeError, ijson.JSONError) as exc:
        detail = " ".join(str(exc).split())  # ijson's messages span lines
        raise ValueError(f"{path}: cannot read instruction data ({detail})") from exc


def _first_byte(f: BinaryIO) -> bytes:
    """The first byte that is not JSON whitespace (b"" for a blank file)."""
    while chunk := f.read(4096):
        stripped = chunk.lstrip(b" \t\r\n")
        if stripped:
            return stripped[:1]
    return b""


def _conversation_turns(conversations: Any) -> list[Turn] | str:
    """Turns, or the reason they cannot be read."""
    if not isinstance(conversations, list):
        return "missing_field"
    turns = []
    for message in conversations:
        if not isinstance(message, dict) or message.get("value") is None:
            return "missing_field"
        if not isinstance(message["value"], str):
            return "not_text"
        role = ROLES.get(str(message.get("from", "")).lower())
        if role is None:
            return "unknown_speaker"
        turns.append(Turn(role, message["value"]))
    return turns


def _resolve_image(name: str, folder: str) -> str | None:
    """The image's path or URI, or None when it is outside the image root `folder`."""
    if uri.is_uri(folder):  # an object-store root: the URI must stay under it
        root = folder.rstrip("/") + "/"
        full = name if uri.is_uri(name) else root + name.lstrip("/")
        parts = full[len(root) :].split("/") if full.startswith(root) else [".."]
        return full if ".." not in parts else None
    if uri.is_uri(name):
        return None
    root = os.path.abspath(folder)
    path = os.path.abspath(os.path.join(folder, name))  # an absolute `name` replaces `folder`
    return path if path.startswith(root.rstrip(os.sep) + os.sep) else None


def _not_text(*values: Any) -> bool:
    """Whether a value that is there is not a string. Data is kept as given: a number, a boolean,
    a list or a mapping is not turned into text (nor silently skipped); its record is dropped as
    `not_text`, the same rule in every format."""
    return any(v is not None and not isinstance(v, str) for v in values)


def _parse(spec: SourceSpec, obj: Any, index: int, image_folder: str) -> Record | Bad:
    source = f"{spec.path}:{index}"
    if obj is None:
        return Bad("malformed_json", source)
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED_FIELDS[spec.format]):
        return Bad("missing_field", source)
    sample_id = str(obj.get("id", source))
    if spec.format == "alpaca":
        prompt, output = obj["instruction"], obj["output"]
        if prompt is None or output is None:
            return Bad("missing_field", source)
        if _not_text(prompt, output, obj.get("input")):
            return Bad("not_text", source)
        extra = (obj.get("input") or "").strip()
        user = f"{prompt.strip()}\n\n{extra}" if extra else prompt.strip()
        turns = [Turn("user", user), Turn("assistant", output)]
    else:
        turns = _conversation_turns(obj["conversations"])
        if isinstance(turns, str):
            return Bad(turns, source)
    if any("\0" in turn.text for turn in turns):
        return Bad("nul_character", source)
    media: dict[str, list[str]] = {"image": [], "video": []}
    for key in media if spec.format == "llava" else ():
        if not obj.get(key):
            continue
        names = obj[key] if isinstance(obj[key], list) else [obj[key]]
        resolved = [_resolve_image(str(n), image_folder) for n in names]
        if any(path is None for path in resolved):
            return Bad(f"{key}_outside_root", source)
        media[key] = [path for path in resolved if path is not None]
    return Record(sample_id, turns, media["image"], source, media["video"])


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if uri.is_uri(path) else str(Path(path).parent)


def read_source(spec: SourceSpec) -> Iterator[Record | Bad]:
    """Records of one instruction file, in file order."""
    path = spec.path
    image_folder = spec.image_folder or _parent(path)
    for index, obj in _iter_json_objects(path):
        yield _parse(spec, obj, index, image_folder)


def check_source(spec: SourceSpec) -> None:
    """Raise ValueError before any work if the file is unreadable or its first record lacks the
    format's fields (usually: the wrong `format` was given)."""
    path = spec.path
    found = uri.file_type(path) == "file" if uri.is_uri(path) else Path(path).is_file()
    if not found:
        raise ValueError(f"{spec.path}: instruction file not found")
    for _, obj in _iter_json_objects(path):
        if obj is None:
            continue  # a malformed line is counted later, not structural
        missing = [
            k for k in REQUIRED_FIELDS[spec.format] if not isinstance(obj, dict) or k not in obj
        ]
        if missing:
            raise ValueError(
                f"{spec.path}: first record has no field(s) {missing} required by format "
                f"{spec.format!r}; check the source's format"
            )
        return


def record_texts(record: Record) -> Iterator[str]:
    """The turn texts of a record (for tokenizer training)."""
    for turn in record.turns:
        yield turn.text
