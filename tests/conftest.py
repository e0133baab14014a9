"""Suite-wide settings.

Tiny models on a 2-core machine run several times faster on one torch thread than on two (the
threads fight each other and the other test processes), so tests use one unless they say otherwise.
Ray workers are separate processes and set their own thread counts.
"""

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
