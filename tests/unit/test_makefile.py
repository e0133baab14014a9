"""The README's two commands, `make demo` and `make test`, run what the README says they run: the
demo job through `owl run` (the command tests/e2e/test_demo.py runs) and lint + the whole suite
(what .ci/run runs). Checked with `make -n`, which prints the recipe without running it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(target: str, *args: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", target, *args],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.splitlines()


def test_the_readme_opens_with_make_demo_and_make_test() -> None:
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_make_demo_sets_up_then_runs_the_demo_job(tmp_path: Path) -> None:
    venv, storage = tmp_path / "venv", tmp_path / "runs"
    lines = _dry_run("demo", f"VENV={venv}", f"STORAGE={storage}")
    assert f"{venv}/bin/pip install -q torch==2.13.0 -r requirements-ci.txt" in lines
    assert lines[-1] == f"{venv}/bin/owl run jobs/demo.yaml --set storage={storage}"
    # The e2e test runs the same job the same way (its own storage, plus --json).
    e2e = (ROOT / "tests" / "e2e" / "test_demo.py").read_text()
    assert '"run", "jobs/demo.yaml", "--set", f"storage={storage}"' in e2e


def test_make_test_lints_then_runs_the_whole_suite(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    lines = _dry_run("test", f"VENV={venv}")
    tail = [
        f"{venv}/bin/ruff check .",
        f"{venv}/bin/ruff format --check .",
        f"{venv}/bin/pytest -q",
    ]
    assert lines[-3:] == tail
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_test_slow_runs_only_the_slow_tests(tmp_path: Path) -> None:
    """`make test` leaves the `slow` tests out (pyproject's addopts), `make test-slow` runs them."""
    venv = tmp_path / "venv"
    assert _dry_run("test-slow", f"VENV={venv}")[-1] == f"{venv}/bin/pytest -q -m slow"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"""^addopts = "[^"\n]*-m 'not slow'""", pyproject, re.MULTILINE)
    assert '"slow: ' in pyproject  # the marker is declared
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow",
         "tests/integration/test_train_ray.py"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "test_train_ray.py::test_zero3_stage2_matches_zero2" in collected, collected


def test_make_gpu_check_runs_the_gpu_check_script(tmp_path: Path) -> None:
    """BENCHMARKS.md's command; tests/integration/test_gpu_check.py runs the script's CPU path."""
    venv, out = tmp_path / "venv", tmp_path / "check.json"
    lines = _dry_run("gpu-check", f"VENV={venv}", f"GPU_CHECK_OUT={out}")
    assert lines[-1] == f"PYTHONPATH={ROOT} {venv}/bin/python bench/gpu_check.py --out {out}"
    assert "make gpu-check" in (ROOT / "BENCHMARKS.md").read_text()
