""".ci/run and `make test-newest` as they run: CI's two legs (`make test`, and `make test-newest`
after it, its environment built in the background meanwhile, with Ray and temp folders of its
own) both decide the exit status, the
background leg's log is printed, and the last line is the main suite's pytest summary; `make
test-newest` without a Python 3.13 stops with a one-line error. A stand-in `make` on PATH plays the
two legs, so nothing is installed here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_MAKE = """#!/usr/bin/env bash
echo "$1 start" >> "$ORDER"
case "$1" in
  setup-newest) sleep 0.3; echo "newest setup, temp in $TMPDIR"; rc=$SETUP_RC ;;
  test-newest) echo "newest leg output, Ray in $RAY_TMPDIR, temp in $TMPDIR"
               echo "467 passed in 150.00s (0:02:30)"; rc=$NEWEST_RC ;;
  test) sleep 0.6; echo "main leg output"; echo "=== short test summary info ==="
        echo "700 passed, 3 skipped in 1500.00s (0:25:00)"; rc=$MAIN_RC ;;
  *) echo "unexpected make $*"; exit 99 ;;
esac
echo "$1 end" >> "$ORDER"
exit $rc
"""


def run_ci(
    tmp_path: Path, newest_rc: int, main_rc: int, setup_rc: int = 0
) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "make").write_text(FAKE_MAKE)
    (bin_dir / "make").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "NEWEST_RC": str(newest_rc),
        "MAIN_RC": str(main_rc),
        "SETUP_RC": str(setup_rc),
        "ORDER": str(tmp_path / "order.txt"),
    }
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(("newest_rc", "main_rc"), [(0, 0), (1, 0), (0, 2)])
def test_ci_runs_both_legs_and_ends_with_the_main_summary(tmp_path, newest_rc, main_rc):
    result = run_ci(tmp_path, newest_rc, main_rc)
    out = result.stdout
    assert (result.returncode == 0) == (newest_rc == 0 and main_rc == 0), out
    assert "main leg output" in out and "newest leg output" in out
    assert out.index("main leg output") < out.index("newest leg output")  # its log comes after
    assert f"make test-newest: exit {newest_rc} after" in out
    ray_tmp, tmp = re.search(r"newest leg output, Ray in (\S+), temp in (\S+)", out).groups()
    assert ray_tmp != tmp and Path(ray_tmp).parent == Path(tmp).parent  # the CI log folder
    assert tmp_path in Path(tmp).parents
    assert Path(ray_tmp).is_dir() == Path(tmp).is_dir() == (newest_rc != 0)  # kept if it failed
    assert out.rstrip("\n").splitlines()[-1] == "700 passed, 3 skipped in 1500.00s (0:25:00)"
    assert ("error: make test-newest failed" in out) == (newest_rc != 0)
    assert ("error: make test failed" in out) == (main_rc != 0)
    # The 3.13 environment is built during the main suite; its tests run only after it ended.
    order = (tmp_path / "order.txt").read_text().splitlines()
    assert order.index("setup-newest start") < order.index("test end")
    assert order.index("test end") < order.index("test-newest start")


def test_a_failed_313_setup_fails_ci_and_runs_no_313_tests(tmp_path):
    result = run_ci(tmp_path, 0, 0, setup_rc=2)
    assert result.returncode != 0
    assert "error: make test-newest failed (exit 2)" in result.stdout
    assert "test-newest start" not in (tmp_path / "order.txt").read_text()
    assert result.stdout.rstrip("\n").splitlines()[-1].startswith("700 passed")


def make_test_newest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv-newest"
    return subprocess.run(
        ["make", "--no-print-directory", "test-newest", f"VENV_NEWEST={venv}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_make_test_newest_without_python_313_is_one_line(tmp_path):
    result = make_test_newest(tmp_path, "PY_NEWEST=")
    assert result.returncode != 0
    assert result.stdout.splitlines() == [
        "error: no Python 3.13 found (python3.13 on PATH, or pyenv's versions/3.13.*): install "
        "one (e.g. pyenv install 3.13) or run make test-newest PY_NEWEST=/path/to/python3.13"
    ]
    assert not (tmp_path / "venv-newest").exists()


@pytest.mark.skipif(sys.version_info[:2] == (3, 13), reason="needs a Python other than 3.13")
def test_make_test_newest_refuses_another_python(tmp_path):
    result = make_test_newest(tmp_path, f"PY_NEWEST={sys.executable}")
    assert result.returncode != 0
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert result.stderr.splitlines()[0] == (
        f"error: {sys.executable} is Python {version}; make test-newest needs 3.13: run make "
        "test-newest PY_NEWEST=/path/to/python3.13"
    )
    assert not (tmp_path / "venv-newest").exists()


def test_the_checkout_guard_sees_what_tests_write_and_not_the_caches(tmp_path):
    """tests/conftest.py compares the checkout's untracked and ignored paths before and after
    the session (caches and virtual environments aside): a test that writes there fails it."""
    from tests.conftest import checkout_paths

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/runs/\n__pycache__/\n")
    for name in ("mlruns/2/meta.yaml", "runs/x/manifest.json", "a/__pycache__/m.pyc", ".venv/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert checkout_paths(str(tmp_path)) == {".gitignore", "mlruns/2/meta.yaml", "runs/x/manifest.json"}  # fmt: skip
