"""Batched greedy generation over benchmark records (`predict`) and their scores (`score`).

A record becomes one or more *queries*: multiple-choice questions are asked once per rotation of
their options (circular evaluation), every other record once. Queries of one type share a
generation budget; within a type they are batched by prompt length to keep left padding small.
The model's batched `generate` gives each row what it would give alone, so the batch size changes
speed, never answers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from owl.data.image import CLIP_MEAN, preprocess_images
from owl.data.video import DEFAULT_NUM_FRAMES, sample_frames
from owl.eval.benchmarks import BenchmarkRecord, is_unanswered
from owl.eval.choice_matching import match_choice
from owl.eval.metrics import (
    LETTERS,
    ChoiceResult,
    MmeResult,
    YesNoResult,
    caption_scores,
    gqa_correct,
    mme_scores,
    multiple_choice_scores,
    parse_yes_no,
    parse_yes_no_mme,
    parse_yes_no_pope,
    pope_scores,
    rotate_options,
    text_correct,
    vqa_accuracy,
    yes_no_scores,
)
from owl.eval.prompts import max_new_tokens, prompt_ids, spec_of
from owl.model.config import OwlConfig
from owl.model.model import OwlModel

if TYPE_CHECKING:  # transformers is not imported here: the evaluate step's actors never need it
    from transformers import PreTrainedTokenizerBase

# The colour of a blank control image: the CLIP mean pixel, which the preprocessing normalises to
# (nearly) zero: no information, no out-of-range values.
BLANK_RGB = tuple(round(c * 255) for c in CLIP_MEAN)


@dataclass(frozen=True)
class Query:
    """One prompt to generate from: a record, with its options rotated by `shift`."""

    record: BenchmarkRecord
    shift: int = 0

    @property
    def options(self) -> tuple[str, ...]:
        return self.record.options[self.shift :] + self.record.options[: self.shift]


def _rotates(record: BenchmarkRecord, circular: bool) -> bool:
    """Whether a multiple-choice record is asked once per rotation of its options: by default
    when `circular`; rule "single" (ScienceQA, SEED, MMBench rows that come with their own
    circular copies) never, rule "circular" always."""
    if record.type != "multiple_choice" or record.rule == "single":
        return False
    return circular or record.rule == "circular"


def expand_queries(records: Sequence[BenchmarkRecord], circular: bool = True) -> list[Query]:
    """Queries in record order; multiple choice once per rotation when `circular`."""
    queries = []
    for record in records:
        num_shifts = len(record.options) if _rotates(record, circular) else 1
        queries.extend(Query(record, shift) for shift in range(num_shifts))
    return queries


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


def sample_score(
    record: BenchmarkRecord, prediction: Mapping[str, Any], vqa_rule: str = "vqav2"
) -> float:
    """One prediction's score: VQA accuracy, 1.0 / 0.0 for right / wrong, NaN for captions
    (caption metrics are corpus-level) and for records without public answers. `vqa_rule` is
    used by VQA records that name no rule of their own."""
    text = prediction["prediction"]
    if record.type == "caption" or is_unanswered(record):
        return math.nan
    if record.type == "vqa":
        return vqa_accuracy(text, record.answers, record.rule or vqa_rule)
    if record.type == "multiple_choice":
        result = choice_result(record, prediction)
        return float(result.predicted == result.answer)
    if record.type == "yes_no":
        return float(_yes_no_parser(record.rule)(text) == record.answer)
    if record.rule == "gqa":
        return float(gqa_correct(text, record.answer))
    return float(text_correct(text, record.answer, record.options or None))


def _yes_no_parser(rule: str) -> Callable[[str], str | None]:
    return {"mme": parse_yes_no_mme, "pope": parse_yes_no_pope}.get(rule, parse_yes_no)


def score(
    records: Sequence[BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
    *,
    caption_meteor: bool = True,
    caption_tokenizer: str = "ptb",
    vqa_rule: str = "vqav2",
) -> dict[str, float]:
    """Metrics per record type, named "<type>.<metric>" (e.g. "vqa.accuracy",
    "multiple_choice.circular_accuracy", "caption.CIDEr"). Records of a split without public
    answers are not scored: their type reports `count` and `unanswered` only (the predictions go
    to the submission file, `owl.eval.submissions`)."""
    by_id = {r.id: r for r in records}
    missing = sorted(set(by_id) - {p["id"] for p in predictions})
    if missing:
        raise ValueError(f"no prediction for {len(missing)} record(s), e.g. {missing[:3]}")
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for prediction in predictions:
        if prediction["id"] not in by_id:
            raise ValueError(f"prediction for unknown record id {prediction['id']!r}")
        grouped[by_id[prediction["id"]].type].append(prediction)
    metrics: dict[str, float] = {}
    for record_type, preds in grouped.items():
        if all(is_unanswered(by_id[p["id"]]) for p in preds):
            ids = {p["id"] for p in preds}
            values = {"count": float(len(ids)), "unanswered": float(len(ids))}
        else:
            values = _score_type(
                record_type, by_id, preds, caption_meteor, caption_tokenizer, vqa_rule
            )
        metrics.update({f"{record_type}.{name}": value for name, value in values.items()})
    return metrics


def _score_type(
    record_type: str,
    by_id: Mapping[str, BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
    caption_meteor: bool,
    caption_tokenizer: str,
    vqa_rule: str,
) -> dict[str, float]:
    if record_type == "caption":
        references = {p["id"]: list(by_id[p["id"]].references) for p in predictions}
        hypotheses = {p["id"]: p["prediction"] for p in predictions}
        return caption_scores(
            references, hypotheses, meteor=caption_meteor, tokenizer=caption_tokenizer
        )
    if record_type == "multiple_choice":
        results = [choice_result(by_id[p["id"]], p) for p in predictions]
        return {
            **multiple_choice_scores(results),
            **_per_category(by_id, predictions, results),
        }
    if record_type == "yes_no":
        return _yes_no_scores(by_id, predictions)
    values = [sample_score(by_id[p["id"]], p, vqa_rule) for p in predictions]
    scores = {"accuracy": sum(values) / len(values), "count": float(len(values))}
    if record_type == "vqa":
        scores.update(_per_answer_type(by_id, predictions, values))
    return scores


def _per_answer_type(
    by_id: Mapping[str, BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
    values: Sequence[float],
) -> dict[str, float]:
    """VQA accuracy per the official answer types (`answer_type`: "yes/no", "number", "other"),
    as the VQAv2 and VizWiz servers report it: "accuracy_yes_no", ...; none without types."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for prediction, value in zip(predictions, values):
        answer_type = by_id[prediction["id"]].extra.get("answer_type")
        if isinstance(answer_type, str) and answer_type:
            by_type[re.sub(r"\W+", "_", answer_type.lower())].append(value)
    return {f"accuracy_{name}": sum(v) / len(v) for name, v in sorted(by_type.items())}


def category_name(category: str) -> str:
    """A category as a metric name part: "Instance Counting" -> "instance_counting"."""
    return re.sub(r"\W+", "_", category.strip().lower()).strip("_")


def _per_category(
    by_id: Mapping[str, BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
    results: Sequence[ChoiceResult],
) -> dict[str, float]:
    """Multiple-choice accuracy (the original option order) per category a record lists in
    `categories` (SEED-Bench: its dimension; ScienceQA: subject, context modality, grade group;
    MMBench: its category and l2-category, as their official scorers report them):
    "accuracy_<category>" and "count_<category>"; where questions were asked under several
    rotations (MMBench's circular evaluation) also "circular_accuracy_<category>"."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    rotations: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for prediction, result in zip(predictions, results):
        right = result.predicted == result.answer
        for category in by_id[prediction["id"]].extra.get("categories") or ():
            name = category_name(str(category))
            rotations[name][result.question_id].append(right)
            if result.shift == 0:  # one answer per question, as `accuracy`
                by_category[name].append(right)
    circular = any(len(asked) > 1 for q in rotations.values() for asked in q.values())
    scores = {}
    for name, right in sorted(by_category.items()):
        scores[f"accuracy_{name}"] = sum(right) / len(right)
        scores[f"count_{name}"] = float(len(right))
        if circular:
            questions = rotations[name].values()
            scores[f"circular_accuracy_{name}"] = sum(all(a) for a in questions) / len(questions)
    return scores


def _yes_no_scores(
    by_id: Mapping[str, BenchmarkRecord], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """MME records (rule "mme") get MME's scores, POPE records ("pope") POPE's, the others
    accuracy / accuracy+ over their pairs; one file holds one kind."""
    rules = {by_id[p["id"]].rule for p in predictions}
    if len(rules) > 1:
        raise ValueError(f"yes/no records mix scoring rules {sorted(rules)}: use one per file")
    rule = rules.pop()
    records = [by_id[p["id"]] for p in predictions]
    parse = _yes_no_parser(rule)
    parsed = [parse(p["prediction"]) for p in predictions]
    if rule == "mme":
        return mme_scores(
            [
                MmeResult(str(r.extra["category"]), r.pair_id, guess, r.answer)
                for r, guess in zip(records, parsed)
            ]
        )
    if rule == "pope":
        return pope_scores([str(g) for g in parsed], [r.answer for r in records])
    return yes_no_scores(
        [YesNoResult(r.pair_id, guess, r.answer) for r, guess in zip(records, parsed)]
    )


def choice_result(record: BenchmarkRecord, prediction: Mapping[str, Any]) -> ChoiceResult:
    """One asked rotation, its reply read by the record's prompt style's matching (MMBench,
    SEED-Bench, ScienceQA: VLMEvalKit's; owl.eval.choice_matching). Rows that are copies of one question (`record.group`, MMBench's
    circular copies) count as rotations of that question: shift = the copy's own rotation
    (`extra["circular_shift"]`) + the rotation we asked it under."""
    query = Query(record, int(prediction["shift"]))
    _, answer = rotate_options(record.options, LETTERS.index(record.answer), query.shift)
    return ChoiceResult(
        question_id=record.group or record.id,
        shift=query.shift + int(record.extra.get("circular_shift", 0)),
        predicted=match_choice(prediction["prediction"], query.options, spec_of(record).matching),
        answer=answer,
    )


def _expected(record: BenchmarkRecord, shift: int) -> str:
    """The reference shown next to a prediction: the commonest human answer, the first reference
    caption, the correct letter under this rotation, or the record's answer ("" without one)."""
    if is_unanswered(record):
        return ""
    if record.type == "vqa":
        return max(set(record.answers), key=record.answers.count)
    if record.type == "caption":
        return record.references[0]
    if record.type == "multiple_choice":
        return LETTERS[(LETTERS.index(record.answer) - shift) % len(record.options)]
    return record.answer


def prediction_rows(
    records: Sequence[BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
    vqa_rule: str = "vqav2",
) -> list[dict[str, Any]]:
    """Predictions with what a reader needs beside them (question, options as asked, expected
    answer, per-sample score): the rows of the predictions table."""
    by_id = {r.id: r for r in records}
    rows = []
    for prediction in predictions:
        record = by_id[prediction["id"]]
        shift = int(prediction["shift"])
        rows.append(
            {
                **prediction,
                "question": record.question,
                "options": list(Query(record, shift).options),
                "expected": _expected(record, shift),
                "score": sample_score(record, prediction, vqa_rule),
            }
        )
    return rows
