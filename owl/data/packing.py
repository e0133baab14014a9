"""Packing samples into rows, and collating rows into model-ready tensors.

A *row* is one sequence of the batch holding one or more whole samples. Packed rows put several
samples side by side up to `max_length` tokens; each sample is its own segment (segment ids
1..k), attends only within itself and restarts its positions at 0. Padding mode (one sample per
row) is the same code with one segment per row, kept for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from owl import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    input_ids: Sequence[int]  # visual slots already expanded to IMAGE_TOKEN_ID runs (list or array)
    labels: Sequence[int]  # IGNORE_INDEX where no loss is taken
    images: list[bytes]  # encoded image files, in placeholder order


def pack_rows(
    order: Sequence[int],
    num_tokens: Sequence[int],
    num_images: Sequence[int],
    *,
    max_length: int,
    max_images_per_row: int,
    window: int = 16,
) -> list[list[int]]:
    """Group sample indices (taken in `order`) into rows, first-fit over the last `window` open rows.

    A sample goes into the first open row with room for its tokens and images; when none has
    room, a new row is opened and, if more than `window` are open, the oldest is closed. Rows
    come out in the order they were opened, so the shuffle of `order` carries over to rows.
    Every index of `order` must fit alone (the loader drops the ones that do not).
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, images left) per row
    open_rows: list[int] = []  # indices into `rows`, oldest first
    for index in order:
        tokens, images = num_tokens[index], num_images[index]
        assert tokens <= max_length and images <= max_images_per_row, index
        target = next((r for r in open_rows if room[r][0] >= tokens and room[r][1] >= images), None)
        if target is None:
            target = len(rows)
            rows.append([])
            room.append((max_length, max_images_per_row))
            open_rows.append(target)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[target].append(index)
        room[target] = (room[target][0] - tokens, room[target][1] - images)
    return rows


def pad_rows(order: Sequence[int]) -> list[list[int]]:
    """Padding mode: one sample per row."""
    return [[index] for index in order]


def collate(rows: list[list[Sample]], *, pad_id: int) -> dict[str, torch.Tensor | list[bytes]]:
    """Rows of samples -> tensors padded to the longest row of this batch.

    Returns input_ids, labels, segment_ids, position_ids (each (B, T) int64) and `image_bytes`,
    the encoded images of the whole batch in row-major placeholder order (the order in which the
    model fills the visual slots).
    """
    length = max(sum(len(s.input_ids) for s in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (B, T)
    segment_ids = torch.zeros(shape, dtype=torch.long)  # (B, T), 0 = padding
    position_ids = torch.zeros(shape, dtype=torch.long)  # (B, T)
    image_bytes: list[bytes] = []
    for b, row in enumerate(rows):
        start = 0
        for k, sample in enumerate(row, start=1):
            n = len(sample.input_ids)
            if len(sample.labels) != n:
                raise ValueError(f"sample has {n} input_ids but {len(sample.labels)} labels")
            input_ids[b, start : start + n] = torch.as_tensor(sample.input_ids)
            labels[b, start : start + n] = torch.as_tensor(sample.labels)
            segment_ids[b, start : start + n] = k
            position_ids[b, start : start + n] = torch.arange(n)
            image_bytes.extend(sample.images)
            start += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "segment_ids": segment_ids,
        "position_ids": position_ids,
        "image_bytes": image_bytes,
    }
