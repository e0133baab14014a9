"""Training: per-stage parameter selection, loss, DeepSpeed config, the worker loop, checkpoints."""
