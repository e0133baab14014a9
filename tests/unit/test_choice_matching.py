"""Multiple-choice replies read as VLMEvalKit's exact matching reads them (its `can_infer`).

Each expected answer is derived from VLMEvalKit's rules (owl.eval.choice_matching lists them; the
rule that decides is named per row): letters first (as words, among the last four), then "answer
is X", then option text; refusals and ambiguity give no option (None here, "Z" there).
"""

from __future__ import annotations

import pytest

from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.choice_matching import match_choice, vlmevalkit_letter
from owl.eval.scoring import score

COLOURS = ("blue", "red", "green", "yellow")  # 2 x 18 = 36 characters: rule 4's length bound
YES_NO = ("yes", "no")  # bound 10
SEED = ("The man is running", "The man is sitting", "A dog", "Two cats")
SCIENCEQA = ("Florida", "Georgia", "Texas")
SHADES = ("red", "dark red")

TABLE = [
    # Rule 2: one option letter as a word, among the last four words.
    ("A", COLOURS, "A"),
    ("B.", COLOURS, "B"),
    ("(C)", COLOURS, "C"),
    ("D)", COLOURS, "D"),
    ("[B]", COLOURS, "B"),
    ("**C**", COLOURS, "C"),
    ("#C", COLOURS, "C"),
    ("{A}", COLOURS, "A"),
    ("C;", COLOURS, "C"),
    ("C!", COLOURS, "C"),
    ("B: red", COLOURS, "B"),
    ("B. red", COLOURS, "B"),
    ("B - red", COLOURS, "B"),
    ("Answer: C", COLOURS, "C"),
    ("The answer is B.", COLOURS, "B"),
    ("The answer is (B)", COLOURS, "B"),
    ("The answer: D. Yellow.", COLOURS, "D"),
    ("I choose B.", COLOURS, "B"),
    ("Option B", COLOURS, "B"),
    ("B is correct", COLOURS, "B"),
    ("The correct answer is **D**", COLOURS, "D"),
    ("I think the right choice here is definitely option B", COLOURS, "B"),
    ("There are C options", COLOURS, "C"),
    ("It's a red one, so A", COLOURS, "A"),  # the letter wins over the text "red"
    ("Z is not an option; B", COLOURS, "B"),  # one option letter: "Z" does not count
    ("Georgia (B)", SCIENCEQA, "B"),
    ("A dog", SEED, "A"),  # the letter A, which happens to be right
    ("A.", YES_NO, "A"),
    # Rule 2 fails (letter too early) and rule 3 reads "answer is X".
    ("The answer is C because it is the warmest colour of all", COLOURS, "C"),
    ("Answer is b", COLOURS, "B"),  # no capital letter word; "answer is" is case-insensitive
    ("The correct answer is **b**", COLOURS, "B"),
    ("The answer is a dog.", COLOURS, "A"),  # the article read as the letter a
    # Rule 4: option text in a short reply.
    ("It is blue.", COLOURS, "A"),
    ("blue", COLOURS, "A"),
    ("Blue", COLOURS, "A"),
    ("The shape is yellow", COLOURS, "D"),
    ("greenish", COLOURS, "C"),  # a substring is enough
    ("C, because the sky is red", COLOURS, "B"),  # C is the 1st of 6 words: too early; "red"
    ("The man is sitting.", SEED, "B"),
    ("Two cats are visible", SEED, "D"),
    ("Texas", SCIENCEQA, "C"),
    ("yes", YES_NO, "A"),
    ("no", YES_NO, "B"),
    ("not", YES_NO, "B"),  # "no" occurs in "not"
    ("red", SHADES, "A"),  # "dark red" does not occur in "red"
    # No option: several letters, refusals, ambiguous or absent text, a reply too long.
    ("A and B", COLOURS, None),
    ("Either A or B", COLOURS, None),
    ("B\nC", COLOURS, None),
    ("Z", COLOURS, None),  # VLMEvalKit's own "no option" letter
    ("Cannot determine the answer", COLOURS, None),
    ("I can't process this file.", COLOURS, None),
    ("Sorry, I can't help with images of people yet.", COLOURS, None),
    ("I'm sorry, but without the image provided I cannot tell", COLOURS, None),
    ("Failed to obtain answer via API", COLOURS, None),
    ("blue and red", COLOURS, None),  # two option texts
    ("I think it is light green with yellow dots", COLOURS, None),
    ("The object in the picture is painted a deep shade of red, like a fire truck", COLOURS, None),
    ("Answer: B. Red is the colour of the circle on the left side", COLOURS, None),  # B too early
    ("A cat sits on the mat near the door", COLOURS, None),  # "A" too early, no option text
    ("I", COLOURS, None),  # not an option letter here
    ("E", COLOURS, None),
    ("a", COLOURS, None),  # lower case is not a letter form
    ("(a)", COLOURS, None),
    ("ABCD", COLOURS, None),
    ("The answer is E", COLOURS, None),  # rule 3 knows A-D only
    ("The answer is D", YES_NO, None),  # D is not an option of two
    ("No, it is not.", YES_NO, None),  # longer than 2 x 5 characters
    ("dark red", SHADES, None),  # both option texts occur
    ("", COLOURS, None),
]


def test_table_has_at_least_sixty_replies() -> None:
    assert len(TABLE) >= 60


@pytest.mark.parametrize(("reply", "options", "expected"), TABLE)
def test_vlmevalkit_exact_matching(reply: str, options: tuple[str, ...], expected) -> None:
    index = match_choice(reply, options, "vlmevalkit")
    assert (None if index is None else "ABCDEFGH"[index]) == expected


def test_refusal_is_vlmevalkits_z() -> None:
    assert vlmevalkit_letter("Cannot determine the answer", COLOURS) == "Z"
    assert vlmevalkit_letter("Z", COLOURS) == "Z"
    assert vlmevalkit_letter("A and B", COLOURS) is None


def test_owl_matching_does_not_read_option_text_in_a_sentence() -> None:
    assert match_choice("It is blue.", COLOURS, "owl") is None
    assert match_choice("It is blue.", COLOURS, "vlmevalkit") == 0
    with pytest.raises(ValueError, match="unknown choice matching"):
        match_choice("A", COLOURS, "gpt")


def _row(qid: str, style: str, answer: str = "A") -> BenchmarkRecord:
    return BenchmarkRecord(id=qid, type="multiple_choice", source="t", question="Colour?",
                           options=COLOURS, answer=answer, prompt=style, rule="single")  # fmt: skip


@pytest.mark.parametrize("style", ["mmbench", "seed", "scienceqa"])
def test_benchmark_styles_score_with_vlmevalkit_matching(style: str) -> None:
    records = [_row("1", style), _row("2", style, "D"), _row("3", style, "B")]
    predictions = [
        {"id": "1", "shift": 0, "prediction": "It is blue."},
        {"id": "2", "shift": 0, "prediction": "The answer is a dog."},  # read as A: wrong
        {"id": "3", "shift": 0, "prediction": "blue and red"},  # ambiguous: no option
    ]
    scores = score(records, predictions)
    assert scores["multiple_choice.accuracy"] == pytest.approx(1 / 3)
    assert scores["multiple_choice.unparsed"] == 1.0


def test_circular_scoring_on_vlmevalkit_matching() -> None:
    """MMBench's circular copies, each reply read by VLMEvalKit's rules: right under every
    rotation or not at all."""
    records = [
        BenchmarkRecord(
            id=qid,
            type="multiple_choice",
            source="t",
            question="Colour?",
            options=options,
            answer=answer,
            prompt="mmbench",
            rule="single",
            group="1",
            extra={"circular_shift": shift},
        )  # fmt: skip
        for qid, options, answer, shift in (
            ("1", ("cat", "dog"), "A", 0),
            ("1000001", ("dog", "cat"), "B", 1),
        )
    ]
    right = [{"id": "1", "shift": 0, "prediction": "A cat."},  # letter A among the last four
             {"id": "1000001", "shift": 0, "prediction": "It is a cat"}]  # fmt: skip
    assert score(records, right)["multiple_choice.circular_accuracy"] == 1.0
    wrong = [right[0], {"id": "1000001", "shift": 0, "prediction": "cat or dog"}]
    scores = score(records, wrong)
    assert scores["multiple_choice.accuracy"] == 1.0
    assert scores["multiple_choice.circular_accuracy"] == 0.0
