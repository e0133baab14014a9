"""End-to-end settings: these jobs start Ray Train worker groups on a 2-core machine that other
work may be loading. Ray Train gives up a worker group's start after 60 s; a start that slow here
means a busy machine, not a lost node (no e2e test loses one: the node-loss tests, which measure
that timeout's part in a recovery, are in tests/integration and keep Ray's default)."""

import os

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
