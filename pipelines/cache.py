"""The storage layout: content-addressed step outputs, per-key locks, and execution records.

```
<storage>/steps/<step>/<key>/            a step's output; committed once manifest.json is there
<storage>/locks/<step>-<key>.lock        held while one process computes that output
<storage>/executions/<id>/execution.json one `owl run`: job, state, MLflow parent run, model
<storage>/executions/<id>/steps/<step>.json  one step in it: state, key, times, run id, error
```
Cache key = sha256 over (step name, step code version, canonical JSON of the step's config and the
model config it depends on, upstream manifests' digests by role, and the content digest of every
local file or folder its config names). Content digests are cached per path under
`<storage>/inputs/`: a file whose size and mtime are unchanged is not read again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from owl.data.manifest import MANIFEST_NAME, Manifest, sha256_file

StepState = Literal["running", "done", "failed", "cached", "interrupted", "skipped"]


# ---------------------------------------------------------------------------------------------
# Keys and step directories


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, dataclasses/tuples/paths made plain."""
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def plain(value: Any) -> Any:
    """`value` as plain JSON-able data (dataclasses to dicts, tuples to lists, paths to str)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def cache_key(
    step: str,
    version: str,
    config: Any,
    model: Any,
    upstream_digests: dict[str, str],
    files: dict[str, str] | None = None,
) -> str:
    """sha256 of everything that determines a step's output (see module docstring).

    `files`: content digest per local input path the config names (`input_paths`); left out of
    the payload when there is none, so keys of steps that read only upstream outputs stay put."""
    payload = {
        "step": step,
        "version": version,
        "config": config,
        "model": model,
        "inputs": upstream_digests,
    }
    if files:
        payload["files"] = files
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Content digests of the input files a step's config names


# Config fields whose strings are never input files, though they may name existing paths
# (download.env: environment variables for the download processes, e.g. HOME=/root).
NOT_INPUTS = frozenset({"env"})


def input_paths(*parts: Any) -> list[str]:
    """Every string in the config parts that names an existing local file or folder, as written.

    `@role/...` paths are covered by that upstream step's manifest digest, URIs (`s3://`) are not
    looked at: their paths are in the config, so the key covers their name, not their content."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in NOT_INPUTS:
                    if "/" in str(k):  # a key may be a path (a training stage's `mix`)
                        walk(k)
                    walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, str) and _local_path(value):
            found.add(value)
        elif isinstance(value, str):
            found.update(p for p in _benchmark_spec_paths(value) if _local_path(p))

    for part in parts:
        walk(plain(part))
    return sorted(found)


def _benchmark_spec_paths(value: str) -> list[str]:
    """The official files of a benchmark import spec (`vqav2:questions.json,images/`), so their
    content is in the evaluate step's key like a benchmark file's."""
    from owl.eval.importers import parse_spec

    try:
        spec = parse_spec(value)
    except ValueError:
        return []
    return spec[2] if spec else []


def _local_path(value: str) -> bool:
    """Whether a config string names an existing local file or folder (not `@role/`, not a URI)."""
    if not value or value.startswith("@") or "://" in value or "\0" in value:
        return False
    return os.path.exists(os.path.expanduser(value))


def input_digests(storage: Path, paths: list[str]) -> dict[str, str]:
    """path (as written) -> sha256 of its content (a folder: of its files' paths and digests)."""
    return {
        path: _content_digest(storage, Path(os.path.expanduser(path)).resolve()) for path in paths
    }


def _content_digest(storage: Path, path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's (relative path, sha256) pairs. Files whose size
    and mtime match the record under `<storage>/inputs/` from an earlier call are not re-read."""
    record_path = storage / "inputs" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(record_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        known = {}  # none yet, or unreadable: recompute
    files: dict[str, list] = {}
    if path.is_dir():
        entries = sorted(
            (os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/"), Path(d) / f)
            for d, _, names in os.walk(path, followlinks=True)
            for f in names
        )
    else:
        entries = [("", path)]
    for rel, full in entries:
        stat = full.stat()
        old = known.get(rel)
        if isinstance(old, list) and old[:2] == [stat.st_size, stat.st_mtime_ns]:
            files[rel] = old
        else:
            files[rel] = [stat.st_size, stat.st_mtime_ns, sha256_file(full)]
    if path.is_dir():
        h = hashlib.sha256()
        for rel, (_, _, digest) in files.items():
            h.update(f"{rel}\0{digest}\n".encode())
        digest = h.hexdigest()
    else:
        digest = files[""][2]
    if files != known:
        write_json_atomic(record_path, {"path": str(path), "digest": digest, "files": files})
    return digest


def step_dir(storage: Path, step: str, key: str) -> Path:
    return storage / "steps" / step / key


def lock_for(storage: Path, step: str, key: str) -> FileLock:
    """The per-key lock: one process computes an output, the others wait and then reuse it."""
    path = storage / "locks" / f"{step}-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def forced_builds(out_dir: Path) -> list[Path]:
    """Folders a forced run builds beside `out_dir` (`<key>.force-<execution>`, and `.old` while
    one is swapped in). Only the holder of the key's lock builds there: one found by a process
    that holds the lock is what a killed run left behind."""
    return sorted(out_dir.parent.glob(f"{out_dir.name}.force-*"))


def remove_forced_builds(out_dir: Path) -> list[Path]:
    """Delete what killed forced runs left beside `out_dir`; call it holding the key's lock."""
    left = forced_builds(out_dir)
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return left


def swap_in(build_dir: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the committed `build_dir`: two renames, then the old one is removed."""
    old = out_dir.with_name(f"{build_dir.name}.old")
    if out_dir.exists():
        out_dir.rename(old)
    build_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_committed(out_dir: Path, full: bool = False) -> tuple[Manifest | None, list[str]]:
    """(manifest, []) for a committed, verified output; (None, problems) otherwise.

    A manifest that does not parse (truncated, empty, edited by hand) counts as absent: the
    problem names the file, and the step is recomputed."""
    if not (out_dir / MANIFEST_NAME).exists():
        return None, []
    try:
        manifest = Manifest.read(out_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        return None, [f"{out_dir / MANIFEST_NAME}: unreadable manifest ({detail})"]
    problems = manifest.verify(out_dir, full=full)
    return (None, problems) if problems else (manifest, [])


def prepare_dir(out_dir: Path, keep: bool) -> None:
    """Un-commit `out_dir`; empty it unless `keep` (a resumable step keeps its checkpoints)."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    if not keep and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Execution records


@dataclass
class StepRecord:
    execution_id: str
    job: str
    step: str
    key: str
    state: StepState
    start: float = 0.0
    end: float = 0.0
    duration_s: float = 0.0
    attempts: int = 0
    mlflow_run_id: str = ""
    error: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


@dataclass
class ExecutionRecord:
    execution_id: str
    job: str
    state: Literal["running", "done", "failed", "interrupted"]
    start: float
    end: float = 0.0
    mlflow_run_id: str = ""
    registered_model: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def new_execution_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _executions(storage: Path) -> Path:
    return storage / "executions"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_step_record(storage: Path, record: StepRecord) -> None:
    path = _executions(storage) / record.execution_id / "steps" / f"{record.step}.json"
    write_json_atomic(path, asdict(record))


def write_execution_record(storage: Path, record: ExecutionRecord) -> None:
    write_json_atomic(_executions(storage) / record.execution_id / "execution.json", asdict(record))


def read_executions(storage: Path, job: str | None = None) -> list[ExecutionRecord]:
    """Executions of `job` (all if None), oldest first; dead 'running' ones read as interrupted."""
    records = []
    for path in sorted(_executions(storage).glob("*/execution.json")):
        record = _read_record(path, ExecutionRecord)
        if record is None:
            continue
        if job is None or record.job == job:
            if record.state == "running" and not _alive(record.host, record.pid):
                record.state = "interrupted"
            records.append(record)
    return sorted(records, key=lambda r: r.start)


def read_step_records(storage: Path, execution_id: str) -> list[StepRecord]:
    """The step records of one execution, in the order they started."""
    folder = _executions(storage) / execution_id / "steps"
    records = [r for p in folder.glob("*.json") if (r := _read_record(p, StepRecord)) is not None]
    for record in records:
        if record.state == "running" and not _alive(record.host, record.pid):
            record.state = "interrupted"
    return sorted(records, key=lambda r: r.start)


def _read_record(path: Path, cls: type) -> Any:
    """A record, or None when the file does not parse (records are written atomically, so only
    a hand edit or a damaged disk does that; status must not fail on it)."""
    try:
        return cls(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive(host: str, pid: int) -> bool:
    """Whether the process that wrote a 'running' record may still run (unknown host: assume so)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
