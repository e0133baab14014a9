"""The environment img2dataset runs in (not a step): shared by the `download` step, which sets it
at import and hands it to its download processes and Ray tasks, and `_img2dataset`, which sets it
before importing img2dataset."""

from __future__ import annotations

import os

# No albumentations update check over the network, no wandb.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


def set_worker_env() -> None:
    """Set `WORKER_ENV` in this process where a variable is not set already."""
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
