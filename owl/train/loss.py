"""Next-token cross entropy for packed (or padded) rows.

Position t predicts the label at t + 1, but only inside one segment: the last token of a packed
sample never predicts the first token of the next one. The objective of a step is the mean over
the supervised tokens of the *global* batch (all micro-batches of all ranks), so a micro-batch
contributes its summed loss divided by the global count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owl import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) labels and segment ids -> (B, T - 1) targets for positions 0..T-2.

    A target is ignored where the next token is in another segment or is padding.
    """
    targets = labels[:, 1:].clone()  # (B, T-1)
    same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    targets[~same_segment] = IGNORE_INDEX
    return targets


def num_supervised(labels: torch.Tensor, segment_ids: torch.Tensor) -> int:
    """Tokens that take loss in this micro-batch, counted exactly as `token_loss_sum` does."""
    return int((shifted_targets(labels, segment_ids) != IGNORE_INDEX).sum())


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    """Summed cross entropy over supervised tokens (fp32), a scalar.

    logits: (B, T, V); labels, segment_ids: (B, T).
    """
    targets = shifted_targets(labels, segment_ids)  # (B, T-1)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def mean_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    """Mean over this batch's supervised tokens (for evaluation and tests)."""
    count = num_supervised(labels, segment_ids)
    if count == 0:
        raise ValueError("batch has no supervised tokens: every label is IGNORE_INDEX")
    return token_loss_sum(logits, labels, segment_ids) / count
