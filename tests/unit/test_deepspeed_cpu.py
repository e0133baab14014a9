"""owl.train.deepspeed_cpu: DeepSpeed on CPU starts without compiling its shared-memory op (the
training stages themselves are checked in tests/integration/test_elastic_resume.py, whose
workers report that their DeepSpeed backend holds no such op)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")


def test_deepspeed_skips_its_shm_op_and_builds_nothing(tmp_path) -> None:
    """In a fresh process whose torch-extensions folder is empty: after `skip_shm_comm`,
    DeepSpeed's own builder function returns no op and nothing was compiled (without the call it
    would compile the op into that folder, a minute or more)."""
    code = (
        "from owl.train.deepspeed_cpu import skip_shm_comm\n"
        "skip_shm_comm()\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "assert build_shm_op() is None\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir())
