"""`owl run` in a real terminal (a tmux pane, a pseudo-terminal): the screen shows owl's own lines
only (the live bars, the summary table, the model and where to look), never what Ray or the steps
print, and nothing is printed after the summary when the process exits. Ray's lines are in the
execution's console.log. A job of light fake steps whose `filter` runs a Ray task (local Ray)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.fake_steps import fake_job

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]

# What owl itself writes on a terminal after its first line: the live bars (a step name, then a
# bar), the summary table (box drawing) with its title and caption, the registered model and
# where to look.
OWL_LINE = re.compile(
    r"^(\S+ +[━╸╺ ]{24} |[┏┃┡│└]|\s+owl run\s*$|\s+\d+/\d+ steps from cache\s*$"
    r"|registered model |MLflow UI: |lineage: )"
)


def tmux(socket: str, *args: str) -> str:
    done = subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_owl_run_on_a_terminal_shows_only_owls_lines(tmp_path):
    storage = tmp_path / "storage"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(fake_job("term", storage)))
    ray_tmp = tempfile.mkdtemp(prefix="owlt", dir="/tmp")  # short: Ray's socket paths
    done_file = tmp_path / "exit-code"
    env = {
        "PYTHONPATH": str(ROOT),
        "OWL_STEPS_TABLE": "tests.integration.fake_steps:RAY_TABLE",
        "RAY_TMPDIR": ray_tmp,
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    owl = f"{shlex.quote(sys.executable)} -m pipelines.cli run {shlex.quote(str(job_file))}"
    script = f"cd {shlex.quote(str(ROOT))} && env -u RAY_ADDRESS {exports} {owl}; echo $? > {done_file}; sleep 600"  # fmt: skip
    socket = f"owl-test-{os.getpid()}"
    tmux(
        socket,
        "-f",
        "/dev/null",
        "new-session",
        "-d",
        "-x",
        "120",
        "-y",
        "60",
        "bash",
        "-c",
        script,
    )
    try:
        deadline = time.monotonic() + 400
        while not done_file.exists():
            assert time.monotonic() < deadline, tmux(socket, "capture-pane", "-p", "-S", "-")
            time.sleep(1)
        time.sleep(2)  # anything printed at exit would be on the screen by now
        screen = tmux(socket, "capture-pane", "-p", "-J", "-S", "-")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done_file.read_text().strip() == "0", screen
    lines = [line for line in screen.splitlines() if line.strip()]
    (execution,) = (storage / "executions").iterdir()
    # One line (the terminal wraps it: the path is not cut), then only owl's own lines.
    assert lines[0] == (
        f"[owl] term: execution {execution.name}; Ray, DeepSpeed and step logs go to "
        f"{execution / 'console.log'} (--verbose shows them)"
    ), screen
    assert [line for line in lines[1:] if not OWL_LINE.match(line)] == [], screen
    assert lines[-1].startswith("lineage: owl audit model term@current"), screen  # the end
    # What Ray and MLflow printed is in the execution's console.log instead.
    log = (execution / "console.log").read_text()
    assert "Started a local Ray instance" in log and "Created version '1' of model 'term'" in log
