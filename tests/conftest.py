"""Suite-wide settings.

Tiny models on a 2-core machine run several times faster on one torch thread than on two (the
threads fight each other and the other test processes), so tests use one unless they say otherwise.
Ray workers are separate processes and set their own thread counts.
"""

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# --- no test writes into the checkout --------------------------------------------------------
# Tests write under tmp_path. The paths below are what Python, pytest, ruff and the virtual
# environments make; anything else that appears in the checkout during the session fails it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BEFORE = pytest.StashKey[set]()
_TOOL_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def checkout_paths(root: str = ROOT) -> set[str] | None:
    """Untracked and ignored paths in the checkout, without the tools' caches and virtual
    environments; None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "-z", "--untracked-files=all", "--ignored"],
            cwd=root, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    paths = {entry[3:] for entry in out.stdout.split("\0") if entry[:2] in ("??", "!!")}
    return {
        p
        for p in paths
        if not _TOOL_PARTS & set(p.split("/"))
        and not p.split("/")[0].startswith(".venv")
        and ".egg-info" not in p.split("/")[0]
    }


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = checkout_paths()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    after = checkout_paths()
    if before is None or after is None:
        return
    written = sorted(after - before)
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"tests wrote into the checkout {ROOT} (use tmp_path): {written[:20]}"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- a local Ray cluster for the tests of one module -----------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray cluster for the module, in a session folder of its own (removed after):
    test sessions running side by side on one machine never share one. A module that needs it in
    every test says `pytestmark = pytest.mark.usefixtures("local_ray")`."""
    import shutil
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
