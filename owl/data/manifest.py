"""Manifests: what a pipeline step produced, with enough to verify it and trace it.

A manifest lists files (relative to the step's output directory) with size and sha256, plus the
step's statistics. It is the commit marker of a step: written last, atomically, as
`<out_dir>/manifest.json`; a directory without one is incomplete and never read as output.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class FileEntry:
    path: str  # relative to the step's output directory, '/'-separated
    size: int
    sha256: str
    rows: int | None = None  # samples in the file, where that means something
    tokens: int | None = None  # tokens in the file (tokenized shards)


@dataclass
class Manifest:
    step: str
    files: list[FileEntry] = field(default_factory=list)
    # Flat numbers: counts, rates, durations, final metrics. Logged as MLflow metrics.
    stats: dict[str, float] = field(default_factory=dict)
    # Drop / failure counts by reason, e.g. {"download.404": 3, "filter.min_side": 7}.
    dropped: dict[str, int] = field(default_factory=dict)
    # Per-step curves, name -> [(step, value), ...]: training loss, learning rate, ...
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # Free-form JSON-able facts for lineage (trainable-parameter table, tokenizer info, ...).
    info: dict[str, Any] = field(default_factory=dict)
    # Relative paths of files worth logging as MLflow artifacts (plots, prediction tables).
    artifacts: list[str] = field(default_factory=list)
    # Filled by the runner when it commits the manifest.
    key: str = ""
    code_version: str = ""
    created_at: float = 0.0

    @property
    def digest(self) -> str:
        """sha256 over the sorted (path, sha256) pairs: identifies the output data itself."""
        h = hashlib.sha256()
        for entry in sorted(self.files, key=lambda e: e.path):
            h.update(f"{entry.path}\0{entry.sha256}\n".encode())
        return h.hexdigest()

    def add_file(
        self,
        out_dir: str | os.PathLike,
        rel_path: str,
        rows: int | None = None,
        tokens: int | None = None,
    ) -> FileEntry:
        full = Path(out_dir) / rel_path
        entry = FileEntry(
            path=rel_path,
            size=full.stat().st_size,
            sha256=sha256_file(full),
            rows=rows,
            tokens=tokens,
        )
        self.files.append(entry)
        return entry

    def shards(self) -> list[FileEntry]:
        """The data files: those listed with a row count. A file that describes another (a
        shard's index, a download shard's table of attempts) has none, so no row is counted
        twice."""
        return [f for f in self.files if f.rows is not None]

    def data_summary(self) -> dict[str, Any]:
        """{rows, tokens, shards, digest} of the data files (`shards`): what the model card and a
        mixing stage's record list for a dataset."""
        shards = self.shards()
        return {
            "rows": sum(f.rows or 0 for f in shards),
            "tokens": sum(f.tokens or 0 for f in shards),
            "shards": len(shards),
            "digest": self.digest,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["digest"] = self.digest
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data.pop("digest", None)
        data["files"] = [FileEntry(**f) for f in data.get("files", [])]
        data["curves"] = {k: [tuple(p) for p in v] for k, v in data.get("curves", {}).items()}
        return cls(**data)

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write `manifest.json` atomically (temp file + rename): the step's commit marker."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        final = out_dir / MANIFEST_NAME
        os.replace(tmp, final)
        return final

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> Manifest:
        path = Path(out_dir) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"{out_dir}: no {MANIFEST_NAME}; the step did not finish there")
        return cls.from_dict(json.loads(path.read_text()))

    def verify(self, out_dir: str | os.PathLike, full: bool = False) -> list[str]:
        """Problems with the files on disk (missing, wrong size, wrong digest if `full`); [] if fine.

        One `stat` per listed file: a cache hit on a step with tens of thousands of files (the
        shapes images) stays well under a second."""
        problems = []
        root = os.fspath(out_dir)
        for entry in self.files:
            path = os.path.join(root, entry.path)
            try:
                size = os.stat(path).st_size
            except (FileNotFoundError, NotADirectoryError):
                problems.append(f"{entry.path}: missing")
                continue
            if size != entry.size:
                problems.append(f"{entry.path}: size {size} != {entry.size}")
            elif full and sha256_file(path) != entry.sha256:
                problems.append(f"{entry.path}: sha256 does not match the manifest")
        return problems
