"""The multi-node cluster (tests/integration/multinode.py), started once for the test files that
use it: a head and two worker nodes with token authentication, each node in its own mount
namespace. A test that kills a node starts it again before it ends."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.integration.multinode import Cluster


@pytest.fixture(scope="session")
def multinode(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    }
    env.pop("PYTHONPATH", None)  # the nodes import owl only from the submitted working_dir
    with Cluster(tmp, tmp / "shared", env, num_workers=2) as cluster:
        yield cluster
