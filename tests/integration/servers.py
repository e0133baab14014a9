"""Local servers the integration tests (and bench/bench_mlflow_auth.py) start: a free loopback
port, and an `mlflow server` process on it (SQLite store and artifacts under a folder), started in
its own session so that stopping it stops its workers too."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(
    tmp: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None, wait_s: float = 400
) -> tuple[subprocess.Popen, str]:
    """`mlflow server` (plus `args`, e.g. `--app-name basic-auth`) storing under `tmp`, with
    `env` added to this process's environment; (process, URI) once /health answers. Its output
    goes to tmp/server.log; RuntimeError with the log's tail if it exits or `wait_s` passes (a
    loaded 2-core CI machine can take minutes)."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", *args,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", str(tmp / "artifacts"),
    ]  # fmt: skip
    with open(tmp / "server.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            log_tail = (tmp / "server.log").read_text()[-3000:]
            raise RuntimeError(f"mlflow server did not start: {log_tail}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is not gone in 30 s (on a loaded
    machine its job consumers are slow to stop)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
