"""The storage layout: content-addressed step outputs, per-key locks, and execution records.

```
<storage>/steps/<step>/<key>/            a step's output; committed once manifest.json is there
<storage>/locks/<step>-<key>.lock        held while one process computes that output
<storage>/executions/<id>/execution.json one `owl run`: job, state, MLflow parent run, model
<storage>/executions/<id>/steps/<step>.json  one step in it: state, key, times, run id, error
```
Cache key = sha256 over (step name, step code version, canonical JSON of the step's config and the
model config it depends on, upstream manifests' digests by role).
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

from owl.data.manifest import MANIFEST_NAME, Manifest

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
    step: str, version: str, config: Any, model: Any, upstream_digests: dict[str, str]
) -> str:
    """sha256 of everything that determines a step's output (see module docstring)."""
    payload = {
        "step": step,
        "version": version,
        "config": config,
        "model": model,
        "inputs": upstream_digests,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def step_dir(storage: Path, step: str, key: str) -> Path:
    return storage / "steps" / step / key


def lock_for(storage: Path, step: str, key: str) -> FileLock:
    """The per-key lock: one process computes an output, the others wait and then reuse it."""
    path = storage / "locks" / f"{step}-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def find_committed(out_dir: Path, full: bool = False) -> tuple[Manifest | None, list[str]]:
    """(manifest, []) for a committed, verified output; (None, problems) otherwise."""
    if not (out_dir / MANIFEST_NAME).exists():
        return None, []
    manifest = Manifest.read(out_dir)
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
        record = ExecutionRecord(**json.loads(path.read_text()))
        if job is None or record.job == job:
            if record.state == "running" and not _alive(record.host, record.pid):
                record.state = "interrupted"
            records.append(record)
    return sorted(records, key=lambda r: r.start)


def read_step_records(storage: Path, execution_id: str) -> list[StepRecord]:
    """The step records of one execution, in the order they started."""
    folder = _executions(storage) / execution_id / "steps"
    records = [StepRecord(**json.loads(p.read_text())) for p in folder.glob("*.json")]
    for record in records:
        if record.state == "running" and not _alive(record.host, record.pid):
            record.state = "interrupted"
    return sorted(records, key=lambda r: r.start)


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
