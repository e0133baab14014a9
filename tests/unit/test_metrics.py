"""Scoring rules on hand-made cases: VQA normalisation and leave-one-out arithmetic, choice
parsing that never guesses, circular evaluation, yes/no accuracy+, text, caption metrics."""

from __future__ import annotations

import pytest

from owl.eval.caption_metrics import caption_scores, java_available
from owl.eval.metrics import (
    ChoiceResult,
    YesNoResult,
    multiple_choice_scores,
    normalize_answer,
    parse_choice,
    parse_yes_no,
    rotate_options,
    text_correct,
    vqa_accuracy,
    yes_no_scores,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("The dog.", "dog"),
        ("an apple", "apple"),
        ("none", "0"),
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("black/white", "black white"),  # a mark not touching a space becomes a space
        ("yes, it is", "yes it is"),  # a mark touching a space is deleted
        ("1,000", "1000"),  # digit,digit: every mark deleted
        ("3.5", "3.5"),  # a decimal point stays
        ("3.", "3"),
        ("  red\tcar\n", "red car"),
        ("ten dogs!", "10 dogs"),
        ("it's", "it's"),  # apostrophes are not punctuation in the official rule
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out_arithmetic() -> None:
    # Rule "normalized": 2 of 10 annotators said "2" (after normalisation): leaving out one of
    # them leaves 1 match (1/3), leaving out any of the other 8 leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["2", "two"] + ["3"] * 8
    assert vqa_accuracy("Two.", answers, "normalized") == pytest.approx(0.6)
    # Official rule: the disagreeing human answers get only the punctuation step, so "two"
    # stays "two" and only "2" matches: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.3)
    # 8 of 10 said "3": min(1, 7/3) and min(1, 8/3) are both 1.
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    # 3 of 10: leaving one of the three out leaves 2/3, else 3/3 -> (3 * 2/3 + 7) / 10 = 0.9.
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0


def test_vqa_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError, match="10"):
        vqa_accuracy("cat", [])


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", 1),
        ("(C)", 2),
        ("A.", 0),
        ("B) blue", 1),
        ("C: green", 2),
        ("The answer is B.", 1),
        ("Answer: (A)", 0),
        ("I think the correct option is C because", 2),
        ("blue", 1),  # exactly one option's text
        ("The Blue.", 1),  # ... after normalisation
        ("D", None),  # a letter beyond the options
        ("A or B", None),  # two letters: no guess
        ("The answer is A, or maybe B", None),
        ("A cat", None),  # the article "A" is not a letter choice
        ("purple", None),
        ("", None),
        ("answer: a", None),  # lower-case "a" is a word, not a letter
    ],
)
def test_parse_choice_never_guesses(reply: str, expected: int | None) -> None:
    assert parse_choice(reply, ["red", "blue", "green"]) == expected


def test_parse_choice_duplicate_option_text_is_ambiguous() -> None:
    assert parse_choice("red", ["red", "Red", "blue"]) is None


def test_rotate_options_moves_the_answer() -> None:
    assert rotate_options(["a", "b", "c", "d"], 0, 1) == (["b", "c", "d", "a"], 3)
    assert rotate_options(["a", "b", "c", "d"], 2, 2) == (["c", "d", "a", "b"], 0)
    assert rotate_options(["a", "b", "c"], 1, 0) == (["a", "b", "c"], 1)


def test_circular_accuracy_needs_every_rotation_right() -> None:
    results = [
        # q1: right in every rotation.
        ChoiceResult("q1", 0, 0, 0), ChoiceResult("q1", 1, 2, 2), ChoiceResult("q1", 2, 1, 1),
        # q2: right in the original order only (always says "A": a position bias).
        ChoiceResult("q2", 0, 0, 0), ChoiceResult("q2", 1, 0, 2), ChoiceResult("q2", 2, 0, 1),
        # q3: unparseable once.
        ChoiceResult("q3", 0, 1, 1), ChoiceResult("q3", 1, None, 0), ChoiceResult("q3", 2, 2, 2),
    ]  # fmt: skip
    scores = multiple_choice_scores(results)
    assert scores["accuracy"] == pytest.approx(1.0)
    assert scores["circular_accuracy"] == pytest.approx(1 / 3)
    assert scores["unparsed"] == 1.0
    assert scores["unparsed_rate"] == pytest.approx(1 / 9)
    assert scores["count"] == 3.0


def test_unparsed_choice_counts_as_wrong() -> None:
    scores = multiple_choice_scores([ChoiceResult("q", 0, None, 0)])
    assert scores["accuracy"] == 0.0
    assert scores["unparsed"] == 1.0


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is no dog", "no"),
        ("I cannot tell", None),
        ("yes and no", "yes"),  # starts with it
        ("maybe yes, maybe no", None),
    ],
)
def test_parse_yes_no(reply: str, expected: str | None) -> None:
    assert parse_yes_no(reply) == expected


def test_yes_no_accuracy_plus() -> None:
    results = [
        YesNoResult("img1", "yes", "yes"), YesNoResult("img1", "no", "no"),  # pair right
        YesNoResult("img2", "yes", "yes"), YesNoResult("img2", "yes", "no"),  # one wrong
        YesNoResult("img3", None, "yes"), YesNoResult("img3", "no", "no"),  # one unparsed
    ]  # fmt: skip
    scores = yes_no_scores(results)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["accuracy_plus"] == pytest.approx(1 / 3)
    assert scores["score"] == pytest.approx(100 * (4 / 6 + 1 / 3))
    assert scores["unparsed"] == 1.0


def test_text_correct() -> None:
    assert text_correct("The Paris.", "paris")
    assert not text_correct("Paris, France", "paris")
    assert text_correct("B", "B", ["London", "Paris"])
    assert text_correct("Paris", "B", ["London", "Paris"])
    assert not text_correct("A", "B", ["London", "Paris"])


def test_caption_scores_rank_a_good_caption_higher() -> None:
    references = {
        "1": ["a red circle on the left", "a red circle left of center", "red circle"],
        "2": ["two blue squares", "a pair of blue squares", "blue squares side by side"],
        "3": ["a green triangle at the top", "green triangle near the top", "a green triangle"],
    }
    good = caption_scores(
        references,
        {"1": "a red circle on the left", "2": "two blue squares", "3": "a green triangle"},
        meteor=False,
    )
    bad = caption_scores(references, {"1": "a dog", "2": "a yellow star", "3": ""}, meteor=False)
    assert set(good) >= {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "count"}
    assert "METEOR" not in good
    assert good["CIDEr"] > bad["CIDEr"] and good["Bleu_1"] > bad["Bleu_1"]
    assert good["ROUGE_L"] > bad["ROUGE_L"]


@pytest.mark.skipif(not java_available(), reason="METEOR needs Java")
def test_caption_meteor_with_java() -> None:
    scores = caption_scores({"1": ["a red circle"]}, {"1": "a red circle"}, meteor=True)
    assert scores["METEOR"] > 50.0


def test_caption_scores_ids_must_match() -> None:
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"1": ["a"]}, {"2": "a"}, meteor=False)
