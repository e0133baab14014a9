"""Scores of predictions: per record type (`score`), per sample (`sample_score`), and the rows of
the predictions table (`prediction_rows`). A prediction is `{"id", "shift", "prediction"}` as
`owl.eval.generate.predict` returns it; the scoring rules themselves are `owl.eval.metrics`.
No model and no torch here.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from owl.eval.benchmarks import BenchmarkRecord, is_unanswered
from owl.eval.caption_metrics import caption_scores
from owl.eval.choice_matching import match_choice
from owl.eval.metrics import (
    LETTERS,
    ChoiceResult,
    MmeResult,
    YesNoResult,
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
from owl.eval.prompts import Query, spec_of


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
