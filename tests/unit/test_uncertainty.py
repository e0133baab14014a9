"""Headline metrics as per-item units: they equal score()'s numbers; bootstrap intervals and
paired comparisons behave as a statistician expects (zero against itself, significant when two
models really differ, not when they do not)."""

from __future__ import annotations

import numpy as np
import pytest

from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.metrics import MME_PERCEPTION
from owl.eval.scoring import score
from owl.eval.uncertainty import (
    Units,
    headline_units,
    interval,
    intervals,
    paired_difference,
    units_from_rows,
)


def _vqa(n: int) -> list[BenchmarkRecord]:
    answers = ("red",) * 7 + ("dark red",) * 3
    return [BenchmarkRecord(id=f"q{i}", type="vqa", source="t", images=("x.png",),
                            question="Colour?", answers=answers) for i in range(n)]  # fmt: skip


def _replies(records, right: set[int], wrong: str = "blue") -> list[dict]:
    return [{"id": r.id, "shift": 0, "prediction": ("dark red" if i % 5 == 0 else "red")
             if i in right else wrong} for i, r in enumerate(records)]  # fmt: skip


def test_vqa_units_equal_the_reported_accuracy_and_the_interval_covers_it() -> None:
    records = _vqa(40)
    predictions = _replies(records, right=set(range(0, 40, 2)) | {1, 3})
    units = headline_units(records, predictions)["vqa"]
    assert units.metric == "accuracy"
    assert units.estimate() == pytest.approx(score(records, predictions)["vqa.accuracy"])
    low, high = interval(units)
    assert low < units.estimate() < high
    assert (low, high) == interval(units)  # seeded: the same to the last digit
    assert intervals({"vqa": units}) == {
        "vqa.accuracy_ci95_low": low,
        "vqa.accuracy_ci95_high": high,
    }


def test_more_items_give_a_narrower_interval() -> None:
    def width(n: int) -> float:
        values = np.array([1.0, 0.0] * (n // 2))
        low, high = interval(Units("accuracy", tuple(map(str, range(n))), ("",) * n, values))
        return high - low

    assert width(1000) < width(100) / 2


def test_circular_multiple_choice_units() -> None:
    records = [BenchmarkRecord(id=f"m{i}", type="multiple_choice", source="t", question="Q?",
                               options=("cat", "dog", "cow"), answer="A") for i in range(6)]  # fmt: skip
    predictions = []
    for i, record in enumerate(records):
        for shift in range(3):  # the correct option "cat" sits at letter (0 - shift) % 3
            letter = "ABC"[(0 - shift) % 3] if i < 2 or shift == 0 else "B"
            predictions.append({"id": record.id, "shift": shift, "prediction": letter})
    units = headline_units(records, predictions)["multiple_choice"]
    assert units.metric == "circular_accuracy"
    scores = score(records, predictions)
    assert units.estimate() == pytest.approx(scores["multiple_choice.circular_accuracy"]) == 2 / 6


def test_mme_units_sum_to_the_perception_score() -> None:
    records, predictions = [], []
    rng = np.random.default_rng(1)
    for category in MME_PERCEPTION[:3] + ("code_reasoning",):
        for image in range(5):
            for answer in ("yes", "no"):
                rid = f"{category}-{image}-{answer}"
                records.append(BenchmarkRecord(
                    id=rid, type="yes_no", source="t", images=("x.png",), question="Q?",
                    answer=answer, pair_id=f"{image}.png", rule="mme",
                    extra={"category": category}))  # fmt: skip
                guess = answer if rng.random() < 0.7 else {"yes": "No", "no": "Yes"}[answer]
                predictions.append({"id": rid, "shift": 0, "prediction": guess})
    units = headline_units(records, predictions)["yes_no"]
    assert units.metric == "perception"
    assert units.estimate() == pytest.approx(score(records, predictions)["yes_no.perception"])
    assert set(units.strata) == set(MME_PERCEPTION[:3])  # cognition is not in perception


def test_caption_units_average_to_the_corpus_cider() -> None:
    refs = [("a red circle on the left", "a red circle"), ("two blue squares", "blue squares"),
            ("a green triangle", "one green triangle"), ("a yellow star", "a star")]  # fmt: skip
    records = [BenchmarkRecord(id=f"c{i}", type="caption", source="t", images=("x.png",),
                               references=r) for i, r in enumerate(refs)]  # fmt: skip
    predictions = [{"id": r.id, "shift": 0, "prediction": text} for r, text in
                   zip(records, ("a red circle", "blue squares", "a red square", "a star"))]  # fmt: skip
    units = headline_units(records, predictions, caption_tokenizer="approx")["caption"]
    scores = score(records, predictions, caption_meteor=False, caption_tokenizer="approx")
    assert units.metric == "CIDEr_approx"
    assert units.estimate() == pytest.approx(scores["caption.CIDEr_approx"])


def test_a_model_against_itself_differs_by_zero_with_p_one() -> None:
    records = _vqa(50)
    units = headline_units(records, _replies(records, right=set(range(30))))["vqa"]
    result = paired_difference(units, units)
    assert result["a"] == result["b"] == units.estimate()
    del result["a"], result["b"]
    assert result == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "count": 50.0}


def test_a_real_difference_is_significant_and_a_swap_is_not() -> None:
    records = _vqa(100)
    strong = headline_units(records, _replies(records, right=set(range(80))))["vqa"]
    weak = headline_units(records, _replies(records, right=set(range(50))))["vqa"]
    result = paired_difference(strong, weak)
    assert result["difference"] == pytest.approx(strong.estimate() - weak.estimate())
    assert 0 < result["low"] < result["difference"] < result["high"]
    assert result["p_value"] < 0.01
    # Same accuracy, right on different items: no difference to find.
    shifted = headline_units(records, _replies(records, right=set(range(1, 81))))["vqa"]
    swap = paired_difference(strong, shifted)
    assert swap["low"] <= 0 <= swap["high"] and swap["p_value"] > 0.5


def test_paired_difference_uses_the_items_both_scored() -> None:
    records = _vqa(60)
    a = headline_units(records, _replies(records, right=set(range(60))))["vqa"]
    b = headline_units(records[:20], _replies(records[:20], right=set()))["vqa"]
    result = paired_difference(a, b)
    assert result["count"] == 20.0 and result["difference"] == pytest.approx(a.values[:20].mean())
    with pytest.raises(ValueError, match="no unit in common"):
        paired_difference(a, Units("accuracy", ("other",), ("",), np.array([1.0])))


def test_units_round_trip_through_rows() -> None:
    records = _vqa(10)
    units = headline_units(records, _replies(records, right={1, 2}))["vqa"]
    [back] = units_from_rows(units.rows("vqa")).values()
    assert back.ids == units.ids and back.metric == "accuracy"
    assert back.estimate() == units.estimate()


def test_owl_status_shows_each_headline_metric_with_its_interval() -> None:
    from pipelines.commands.run import metric_lines

    metrics = {"vqa.accuracy": 0.8724, "vqa.accuracy_ci95_low": 0.8412,
               "vqa.accuracy_ci95_high": 0.9003, "vqa.count": 200.0}  # fmt: skip
    assert metric_lines(metrics) == [
        "vqa.accuracy 0.8724 [95%: 0.8412, 0.9003]",
        "vqa.count 200",
    ]
