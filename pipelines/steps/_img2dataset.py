"""img2dataset's resizer preceded by a header check that names bad bytes precisely.

In its own module so that `pipelines.steps.download` imports (for its `Config`) without
img2dataset, while the class still pickles by reference into download processes and Ray tasks.
"""

from __future__ import annotations

import os
from typing import Any

from pipelines.steps.download import _WORKER_ENV

for _name, _value in _WORKER_ENV.items():  # before img2dataset imports albumentations
    os.environ.setdefault(_name, _value)

from img2dataset.resizer import Resizer  # noqa: E402

from owl.data.filters import sniff_image_problem  # noqa: E402


class CheckedResizer(Resizer):
    """Names a truncated JPEG, a decompression bomb, a 0-byte file or HTML bytes (header only,
    no pixel decoding), then hands the bytes to img2dataset's own resizer."""

    def __init__(self, max_image_pixels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_image_pixels = max_image_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):  # noqa: ANN001 (img2dataset's API)
        problem = sniff_image_problem(img_stream.getvalue(), self.max_image_pixels)
        if problem is not None:
            return None, None, None, None, None, problem
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)
