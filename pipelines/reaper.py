"""Stops the processes of a local Ray that `owl run` started, once that `owl run` is gone.

`ray.init()` without an address starts a local cluster whose GCS server and raylet share the
driver's fate, but the raylet's own helpers (the dashboard agent and the runtime-env agent) do
not: after a `kill -9` of `owl run` they were left running, parented to init, indefinitely. The
runner starts this watcher in its own session right after starting such a cluster:

    python -m pipelines.reaper DRIVER_PID SESSION_DIR

It polls the driver once a second; when the driver has exited (for any reason) it kills every
process that still holds a file under the Ray session folder (logs, sockets), then exits. After a
normal `ray.shutdown()` the runner terminates the watcher itself. Linux and macOS (psutil).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import psutil


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Live processes with a file open under `session_dir` (every process of that Ray session
    writes its logs there), or naming it on their command line."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if any(f.path.startswith(session_dir) for f in proc.open_files()) or any(
                session_dir in arg for arg in proc.cmdline()
            ):
                found.append(proc)
    return found


def watch(driver_pid: int, session_dir: str, poll_s: float = 1.0) -> int:
    """Wait for the driver to exit, then kill what is left of its Ray session; the count."""
    try:
        driver = psutil.Process(driver_pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
            time.sleep(poll_s)
    except psutil.NoSuchProcess:
        pass
    left = [p for p in session_processes(session_dir) if p.pid != driver_pid]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
    return len(left)


def start(session_dir: str) -> subprocess.Popen:
    """Start the watcher for this process's Ray session (own session: a Ctrl-C or a kill of the
    driver's process group does not take it along)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.reaper", str(psutil.Process().pid), session_dir],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
