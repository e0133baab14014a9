"""The multi-node cluster (tests/integration/multinode.py), started once for the test files that
use it: a head and two worker nodes with token authentication, each node in its own mount
namespace. A test that kills a node starts it again before it ends.

The test files that use it run one after the other (pytest_collection_modifyitems moves them
next to the first), and the cluster stops after the last test that uses it, not at the end of
the session: idle, its three nodes would otherwise take CPU from every later test."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.integration.multinode import Cluster

USES = "multinode"  # the fixture's name
_STOP_AFTER = pytest.StashKey[str]()  # nodeid of the last test that uses the cluster
_RUNNING = pytest.StashKey[Cluster]()


def pytest_collection_modifyitems(session, config, items) -> None:
    """The multinode users' files moved next to the first of them (order otherwise kept)."""
    users = {item.path for item in items if USES in getattr(item, "fixturenames", ())}
    if len(users) < 2:
        return
    grouped = [item for item in items if item.path in users]
    first = next(i for i, item in enumerate(items) if item.path in users)
    rest = [item for item in items if item.path not in users]
    items[:] = rest[:first] + grouped + rest[first:]


@pytest.fixture(scope="session")
def multinode(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    }
    env.pop("PYTHONPATH", None)  # the nodes import owl only from the submitted working_dir
    users = [i.nodeid for i in request.session.items if USES in getattr(i, "fixturenames", ())]
    with Cluster(tmp, tmp / "shared", env, num_workers=2) as cluster:
        request.session.stash[_RUNNING] = cluster
        request.session.stash[_STOP_AFTER] = users[-1] if users else ""
        yield cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    stash = item.session.stash
    if item.nodeid == stash.get(_STOP_AFTER, None) and _RUNNING in stash:
        stash[_RUNNING].stop()  # the session's finalizer finds it stopped (stop is idempotent)
    return result
