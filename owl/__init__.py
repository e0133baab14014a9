"""owl: the mPLUG-Owl / mPLUG-Owl2 library (model, data formats, training loop, evaluation).

Imports torch, transformers, pyarrow and friends only: never ray, mlflow or deepspeed at import time.
"""

__version__ = "0.1.0"

# Token id that marks one visual-token slot in `input_ids`. A tokenized image placeholder expands to
# `OwlConfig.num_visual_tokens` copies of it; the model overwrites those positions with the image's
# visual embeddings. Negative, so it never collides with a vocabulary id (the authors use -200 too).
IMAGE_TOKEN_ID = -200

# Label value ignored by the loss (PyTorch's cross_entropy default).
IGNORE_INDEX = -100
