"""Batched greedy generation over benchmark records (`predict`); owl.eval.scoring scores what it
returns.

A record becomes one or more *queries* (`owl.eval.prompts.expand_queries`): multiple-choice questions are asked once per rotation of
their options (circular evaluation), every other record once. Queries of one type share a
generation budget; within a type they are batched by prompt length to keep left padding small.
The model's batched `generate` gives each row what it would give alone, so the batch size changes
speed, never answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from owl.data.image import CLIP_MEAN, preprocess_images
from owl.data.video import DEFAULT_NUM_FRAMES, sample_frames
from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.prompts import Query, expand_queries, max_new_tokens, prompt_ids
from owl.model.config import OwlConfig
from owl.model.model import OwlModel

if TYPE_CHECKING:  # transformers is not imported here: the evaluate step's actors never need it
    from transformers import PreTrainedTokenizerBase

# The colour of a blank control image: the CLIP mean pixel, which the preprocessing normalises to
# (nearly) zero: no information, no out-of-range values.
BLANK_RGB = tuple(round(c * 255) for c in CLIP_MEAN)


def load_images(
    record: BenchmarkRecord,
    cfg: OwlConfig,
    blank: bool = False,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> torch.Tensor:
    """The record's images, then `num_frames` frames of each of its videos, preprocessed alike
    for the model: (n, 3, S, S), n = 0 without any.

    `blank` replaces each image and frame by a uniform one of the mean colour (the image-blind
    control)."""
    size = cfg.vision.image_size
    num_slots = len(record.images) + num_frames * len(record.videos)
    if not num_slots:
        return torch.zeros(0, cfg.vision.num_channels, size, size)
    if blank:
        sources: list[Any] = [Image.new("RGB", (size, size), BLANK_RGB) for _ in range(num_slots)]
    else:
        sources = [Path(path).read_bytes() for path in record.images]
        for path in record.videos:
            sources.extend(sample_frames(Path(path).read_bytes(), num_frames))
    return preprocess_images(sources, size, cfg.image_mode)  # (n, 3, S, S)


def _batches(
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    batch_size: int,
) -> list[list[int]]:
    """Query indices grouped by type and budget, longest prompts first, cut into batches."""
    by_type: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index, query in enumerate(queries):
        by_type[(query.record.type, budgets[index])].append(index)
    batches = []
    for indices in by_type.values():
        indices.sort(key=lambda i: -len(prompts[i]))
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    return batches


def _check_lengths(
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    max_positions: int,
) -> None:
    """Fail before generating when a prompt plus its budget overruns the model's positions."""
    for query, prompt, budget in zip(queries, prompts, budgets):
        total = len(prompt) + budget
        if total > max_positions:
            raise ValueError(
                f"{query.record.source}: {len(prompt)} prompt tokens (images included) + "
                f"{budget} new exceed the model's {max_positions} positions; "
                "shorten the record or lower max_new_tokens for its type"
            )


def encode_queries(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[BenchmarkRecord],
    cfg: OwlConfig,
    *,
    max_new_tokens_by_type: Mapping[str, int] | None = None,
    circular: bool = True,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> tuple[list[Query], list[list[int]], list[int]]:
    """The queries of `records` (see `expand_queries`), their prompt ids and generation budgets.

    A budget is `max_new_tokens_by_type[type]` when given, else the prompt style's
    (owl.eval.prompts.PROMPTS). Fails before anything is generated when a prompt plus its budget
    overruns the model's positions."""
    queries = expand_queries(records, circular)
    budgets = [max_new_tokens(q.record, max_new_tokens_by_type) for q in queries]
    prompts = [
        prompt_ids(
            tokenizer, q.record, variant=cfg.variant, placeholder=cfg.image_placeholder,
            num_visual_tokens=cfg.num_visual_tokens, options=q.options, num_frames=num_frames,
        )
        for q in queries
    ]  # fmt: skip
    _check_lengths(queries, prompts, budgets, cfg.decoder.max_positions)
    return queries, prompts, budgets


@torch.no_grad()
def generate_replies(
    model: OwlModel,
    queries: Sequence[Query],
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    *,
    eos_token_id: int | None,
    batch_size: int = 8,
    blank_images: bool = False,
    progress: Callable[[int, int], None] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> list[list[int]]:
    """Greedy new token ids per query (EOS excluded), in query order. Needs no tokenizer: the
    evaluate step's actors run this on prompts the driver encoded (with the same `num_frames`
    per video). `progress(done, total)` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    replies: list[list[int]] = [[] for _ in queries]
    done = 0
    for batch in _batches(queries, prompts, budgets, batch_size):
        batch_queries = [queries[i] for i in batch]
        images = None
        if any(q.record.images or q.record.videos for q in batch_queries):
            images = [
                load_images(q.record, cfg, blank_images, num_frames).to(dtype)
                for q in batch_queries
            ]
        outputs = model.generate(
            [prompts[i] for i in batch],
            images,
            max_new_tokens=budgets[batch[0]],
            temperature=0.0,
            eos_token_id=eos_token_id,
        )
        for index, output in zip(batch, outputs):
            replies[index] = output
        done += len(batch)
        if progress is not None:
            progress(done, len(queries))
    return replies


def decode_replies(
    tokenizer: PreTrainedTokenizerBase, queries: Sequence[Query], replies: Sequence[list[int]]
) -> list[dict[str, Any]]:
    """Predictions from replies: id, type, shift (option rotation), prediction (decoded text),
    num_new_tokens."""
    return [
        {
            "id": q.record.id,
            "type": q.record.type,
            "shift": q.shift,
            "prediction": tokenizer.decode(reply, skip_special_tokens=True).strip(),
            "num_new_tokens": len(reply),
        }
        for q, reply in zip(queries, replies)
    ]


def predict(
    model: OwlModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[BenchmarkRecord],
    *,
    batch_size: int = 8,
    max_new_tokens_by_type: Mapping[str, int] | None = None,
    blank_images: bool = False,
    circular: bool = True,
    progress: Callable[[int, int], None] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> list[dict[str, Any]]:
    """Greedy replies for every query of `records`, in query order (see `expand_queries`):
    `encode_queries`, `generate_replies`, `decode_replies` in one process.

    Each prediction: id, type, shift (option rotation), prediction (decoded text), num_new_tokens.
    A query's budget is `max_new_tokens_by_type[type]` when given, else its prompt style's
    (owl.eval.prompts.PROMPTS). `progress(done, total)` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    queries, prompts, budgets = encode_queries(
        tokenizer, records, model.cfg, max_new_tokens_by_type=max_new_tokens_by_type,
        circular=circular, num_frames=num_frames,
    )  # fmt: skip
    replies = generate_replies(
        model, queries, prompts, budgets, eos_token_id=tokenizer.eos_token_id,
        batch_size=batch_size, blank_images=blank_images, progress=progress,
        num_frames=num_frames,
    )  # fmt: skip
    return decode_replies(tokenizer, queries, replies)
