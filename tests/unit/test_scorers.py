"""The owners' scoring rules on hand-computed cases: the official VQAv2 script's conventions
(human answers left as written when all agree, at most 32 periods stripped), VizWiz's, MME's
per-subtask acc / acc+ and perception / cognition totals, POPE, GQA, MMBench circular groups,
the caption tokenizer refusing to change a metric silently, and the widened letter parser."""

from __future__ import annotations

import pytest

from owl.eval import caption_metrics
from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.caption_metrics import caption_scores
from owl.eval.metrics import (
    MmeResult,
    gqa_correct,
    mme_scores,
    parse_choice,
    parse_yes_no_mme,
    parse_yes_no_pope,
    pope_scores,
    vqa_accuracy,
)
from owl.eval.scoring import score


@pytest.mark.parametrize(
    ("prediction", "answers", "rule", "expected"),
    [
        # All ten agree: the official script compares them as written. The prediction is
        # normalised ("t-shirt" -> "t shirt"), the humans are not: no match.
        ("t-shirt", ["t-shirt"] * 10, "vqav2", 0.0),
        ("t-shirt", ["t-shirt"] * 10, "normalized", 1.0),
        # ... so an unnormalised human answer ("Yes") never matches the lower-cased prediction.
        ("yes", ["Yes"] * 10, "vqav2", 0.0),
        ("yes", ["Yes"] * 10, "normalized", 1.0),
        ("Yes.", ["yes"] * 10, "vqav2", 1.0),  # the prediction is always normalised
        # At most 32 periods are stripped (re.sub's count argument took re.UNICODE = 32).
        ("yes" + "." * 32, ["yes"] * 10, "vqav2", 1.0),
        ("yes" + "." * 40, ["yes"] * 10, "vqav2", 0.0),
        ("yes" + "." * 40, ["yes"] * 10, "normalized", 1.0),
        # Disagreeing humans get the punctuation step only: "black/white" -> "black white".
        ("black white", ["black/white"] * 5 + ["gray"] * 5, "vqav2", 1.0),
        ("black white", ["black/white"] * 5 + ["gray"] * 5, "vizwiz", 0.0),  # humans as written
        # ... but not the number/article step: "two" stays "two" while "Two" becomes "2".
        ("Two", ["two"] * 5 + ["three"] * 5, "vqav2", 0.0),
        ("Two", ["two"] * 5 + ["three"] * 5, "normalized", 1.0),
    ],
)
def test_vqa_rules_edge_cases(prediction, answers, rule, expected) -> None:
    assert vqa_accuracy(prediction, answers, rule) == pytest.approx(expected)


def test_vqa_unknown_rule() -> None:
    with pytest.raises(ValueError, match="unknown rule"):
        vqa_accuracy("a", ["a"] * 10, "lenient")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("**B**", 1),
        ("`B`", 1),
        ("__C__", 2),
        ("**B.** blue", 1),
        ("B,", 1),
        ("B, blue", 1),
        ("(B), blue", 1),
        ("B blue", 1),  # the letter followed by exactly its option's text
        ("B the blue", 1),  # ... after VQA normalisation
        ("B green", None),  # the text is another option's: no guess
        ("A cat sat", None),  # "A" as an article
        ("A, B", None),  # two letters
        ("B, or maybe C", None),
        ("It is blue-ish", None),  # free text is never guessed
    ],
)
def test_parse_choice_markdown_and_comma_forms(reply: str, expected: int | None) -> None:
    assert parse_choice(reply, ["red", "blue", "green"]) == expected


def test_mme_scores_per_subtask_and_totals() -> None:
    assert [parse_yes_no_mme(r) for r in ("Yes", "yes, there is", "Not sure", "maybe")] == [
        "yes", "yes", "no", None,
    ]  # fmt: skip
    results = [
        # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2 -> 125
        MmeResult("existence", "1.jpg", "yes", "yes"),
        MmeResult("existence", "1.jpg", "no", "no"),
        MmeResult("existence", "2.jpg", "no", "yes"),
        MmeResult("existence", "2.jpg", "no", "no"),
        # count: both right -> 200
        MmeResult("count", "3.jpg", parse_yes_no_mme("yes, there is"), "yes"),
        MmeResult("count", "3.jpg", parse_yes_no_mme("Not sure"), "no"),
        # code_reasoning (cognition): one unparsed, one right -> acc 1/2, acc+ 0 -> 50
        MmeResult("code_reasoning", "4.png", parse_yes_no_mme("maybe"), "yes"),
        MmeResult("code_reasoning", "4.png", "no", "no"),
    ]
    scores = mme_scores(results)
    assert scores["existence.acc"] == pytest.approx(0.75)
    assert scores["existence.acc_plus"] == pytest.approx(0.5)
    assert scores["existence.score"] == pytest.approx(125.0)
    assert scores["count.score"] == pytest.approx(200.0)
    assert scores["code_reasoning.score"] == pytest.approx(50.0)
    assert scores["perception"] == pytest.approx(325.0)
    assert scores["cognition"] == pytest.approx(50.0)
    assert scores["unparsed"] == 1.0
    with pytest.raises(ValueError, match="unknown subtask"):
        mme_scores([MmeResult("colour", "x", "yes", "yes")])


def test_pope_parser_and_metrics() -> None:
    replies = ["Yes, there is a dog.", "There is no cat.", "No.", "I do not see one", "yes"]
    predicted = [parse_yes_no_pope(r) for r in replies]
    assert predicted == ["yes", "no", "no", "no", "yes"]
    scores = pope_scores(predicted, ["yes", "no", "yes", "no", "no"])
    # TP 1, FP 1, TN 2, FN 1
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)
    assert scores["yes_ratio"] == pytest.approx(0.4)


def test_gqa_exact_match() -> None:
    assert gqa_correct(" Yes.", "yes")
    assert gqa_correct("Table", "table")
    assert not gqa_correct("the table", "table")  # no article stripping: GQA is exact
    assert not gqa_correct("tables", "table")


def test_mmbench_circular_copies_are_one_question() -> None:
    def row(index: int, options, answer, group="", shift=0) -> BenchmarkRecord:
        return BenchmarkRecord(
            id=str(index), type="multiple_choice", source="t", question="Q?",
            options=tuple(options), answer=answer, rule="single", group=group,
            extra={"circular_shift": shift},
        )  # fmt: skip

    records = [
        row(1, ["cat", "dog"], "A", "1", 0),
        row(1000001, ["dog", "cat"], "B", "1", 1),  # the copy, options rotated
        row(2, ["red", "blue"], "B", "2", 0),
        row(1000002, ["blue", "red"], "A", "2", 1),
    ]
    predictions = [
        {"id": "1", "shift": 0, "prediction": "A"},
        {"id": "1000001", "shift": 0, "prediction": "B"},  # right again: question 1 right
        {"id": "2", "shift": 0, "prediction": "B"},
        {"id": "1000002", "shift": 0, "prediction": "B"},  # wrong on the copy
    ]
    scores = score(records, predictions)
    assert scores["multiple_choice.count"] == 2.0
    assert scores["multiple_choice.accuracy"] == pytest.approx(1.0)  # the main rows
    assert scores["multiple_choice.circular_accuracy"] == pytest.approx(0.5)


def test_caption_metrics_refuse_without_java_unless_approx(monkeypatch) -> None:
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)
    refs = {"1": ["a red circle on the left"], "2": ["a blue square"]}
    hyps = {"1": "a red circle", "2": "a blue square"}
    with pytest.raises(ValueError, match="apt-get install default-jre-headless"):
        caption_scores(refs, hyps, meteor=False)
    approx = caption_scores(refs, hyps, meteor=True, tokenizer="approx")
    assert "CIDEr" not in approx and "METEOR" not in approx
    assert approx["CIDEr_approx"] > 0 and "Bleu_4_approx" in approx


@pytest.mark.skipif(not caption_metrics.java_available(), reason="needs Java (PTB tokenizer)")
def test_caption_metrics_with_ptb_keep_official_names() -> None:
    scores = caption_scores({"1": ["A red circle."]}, {"1": "a red circle"}, meteor=False)
    assert "CIDEr" in scores and not any(k.endswith("_approx") for k in scores)


def test_unanswered_split_is_counted_not_scored() -> None:
    record = BenchmarkRecord(id="7", type="vqa", source="t", images=("x",), question="Q?")
    scores = score([record], [{"id": "7", "shift": 0, "prediction": "yes"}])
    assert scores == {"vqa.count": 1.0, "vqa.unanswered": 1.0}


@pytest.mark.skipif(not caption_metrics.java_available(), reason="needs Java (PTB tokenizer)")
def test_caption_scores_equal_the_official_coco_pipeline(monkeypatch) -> None:
    """COCOEvalCap (COCO's own pipeline: pycocotools COCO + loadRes, PTB tokenizer, the toolkit's
    scorers) on the same captions gives the same Bleu/ROUGE_L/CIDEr as caption_scores. Its SPICE
    (downloads models) and METEOR (slow JVM) are swapped for stubs; the rest runs as shipped."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class _Skipped:
        def method(self) -> str:
            return "skipped"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", _Skipped)
    monkeypatch.setattr(coco_eval, "Meteor", _Skipped)
    references = {
        1: ["A man riding a bike down the street.", "A cyclist on a city road."],
        2: ["Two dogs play in the snow.", "A pair of dogs running through snow!"],
        3: ["A plate of food with broccoli, rice and meat."],
    }
    predictions = {1: "a man rides a bike on a street", 2: "two dogs in the snow", 3: "food"}
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in references],
        "annotations": [
            {"id": 10 * i + j, "image_id": i, "caption": c}
            for i, caps in references.items()
            for j, c in enumerate(caps)
        ],
    }
    coco.createIndex()
    results = coco.loadRes([{"image_id": i, "caption": c} for i, c in predictions.items()])
    official = coco_eval.COCOEvalCap(coco, results)
    official.evaluate()
    ours = caption_scores(
        {str(i): refs for i, refs in references.items()},
        {str(i): c for i, c in predictions.items()},
        meteor=False,
    )
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert ours[name] == pytest.approx(100.0 * official.eval[name], abs=1e-9), name


def test_vqa_accuracy_per_official_answer_type() -> None:
    def vqa(qid: str, answer: str, answer_type: str | None) -> BenchmarkRecord:
        extra = {"answer_type": answer_type} if answer_type else {}
        return BenchmarkRecord(
            id=qid, type="vqa", source="t", images=("x",), question="Q?",
            answers=(answer,) * 10, extra=extra,
        )  # fmt: skip

    records = [vqa("1", "yes", "yes/no"), vqa("2", "2", "number"), vqa("3", "red", "other"),
               vqa("4", "no", "yes/no")]  # fmt: skip
    replies = {"1": "Yes", "2": "3", "3": "red", "4": "yes"}
    scores = score(records, [{"id": i, "shift": 0, "prediction": r} for i, r in replies.items()])
    assert scores["vqa.accuracy"] == pytest.approx(0.5)
    assert scores["vqa.accuracy_yes_no"] == pytest.approx(0.5)
    assert scores["vqa.accuracy_number"] == 0.0 and scores["vqa.accuracy_other"] == 1.0
    # without answer types (the demo's files): no per-type metric
    plain = score([vqa("5", "red", None)], [{"id": "5", "shift": 0, "prediction": "red"}])
    assert set(plain) == {"vqa.accuracy", "vqa.count"}


def test_type_default_prompts_are_unchanged() -> None:
    """The demo's benchmarks name no prompt style: their prompts are exactly the project's
    generic ones the demo's metrics were measured with (strings as before the prompt table)."""
    from owl.eval.prompts import max_new_tokens, question_text

    def record(record_type: str, **fields) -> BenchmarkRecord:
        return BenchmarkRecord(id="1", type=record_type, source="t", **fields)  # type: ignore[arg-type]

    cases = [
        (record("vqa", question="What?"),
         "What? Answer the question using a single word or phrase.", 10),
        (record("caption"), "Provide a one-sentence caption for the provided image.", 30),
        (record("multiple_choice", question="Q?", options=("a", "b", "c"), answer="A", hint="Hint."),
         "Hint.\nQ?\nA. a\nB. b\nC. c\nAnswer with the option's letter from the given choices directly.", 10),
        (record("multiple_choice", question="Q?", options=("a", "b"), answer="A"),
         "Q?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.", 10),
        (record("yes_no", question="Is it? Please answer yes or no.", answer="yes", pair_id="p"),
         "Is it? Please answer yes or no.", 10),
        (record("yes_no", question="Is it?", answer="yes", pair_id="p"),
         "Is it? Please answer yes or no.", 10),
        (record("text", question="Capital?", answer="Paris"), "Capital?", 64),
        (record("text", question="Capital?", options=("x", "y"), answer="A", hint="h"),
         "h\nCapital?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.", 64),
    ]  # fmt: skip
    for rec, text, budget in cases:
        assert question_text(rec) == text
        assert max_new_tokens(rec) == budget


def test_authors_prompts_for_imported_benchmarks() -> None:
    """MMBench keeps the authors' 'N/A' hint and U+2019 apostrophe; MME drops its yes/no
    instruction for the short-answer suffix (evaluate_mmbench.py / evaluate_mme.py)."""
    from owl.eval.prompts import max_new_tokens, question_text

    mmbench = BenchmarkRecord(id="1", type="multiple_choice", source="t", question="Q?",
                              options=("a", "b"), answer="A", prompt="mmbench")  # fmt: skip
    assert question_text(mmbench) == (
        "N/A\nQ?\nA. a\nB. b\nAnswer with the option\u2019s letter from the given choices directly."
    )
    mme = BenchmarkRecord(id="2", type="yes_no", source="t", images=("x",), answer="yes",
                          question="Is there a dog? Please answer yes or no.", pair_id="p",
                          prompt="mme")  # fmt: skip
    assert question_text(mme) == (
        "Is there a dog? \nAnswer the question using a single word or phrase."
    )
    caption = BenchmarkRecord(id="3", type="caption", source="t", images=("x",),
                              references=("r",), prompt="coco_caption")  # fmt: skip
    assert max_new_tokens(caption) == 60 and max_new_tokens(mme) == 10


def _letters(records, right: set[str]) -> list[dict]:
    """A prediction per record: its answer letter when its id is in `right`, else another."""
    return [{"id": r.id, "shift": 0,
             "prediction": r.answer if r.id in right else "BA"[r.answer == "B"]}
            for r in records]  # fmt: skip


def test_seed_accuracy_per_dimension_from_the_official_json(tmp_path) -> None:
    """SEED-Bench's eval.py: accuracy per question_type_id; the names from the JSON's
    `question_type` map; video questions are not imported."""
    from official_files import _image, _json

    from owl.eval.benchmarks import read_benchmark
    from owl.eval.importers import import_benchmark

    questions = []
    for qid, type_id, answer in (("1", 1, "A"), ("2", 1, "B"), ("3", 1, "C"), ("4", 5, "D"),
                                 ("5", 5, "A")):  # fmt: skip
        _image(tmp_path / f"SEED-Bench-image/{qid}.jpg")
        questions.append({"question_id": qid, "question": "Q?", "choice_a": "a",
                          "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": answer,
                          "data_id": f"{qid}.jpg", "data_type": "image",
                          "question_type_id": type_id})  # fmt: skip
    questions.append({"question_id": "v", "question": "?", "choice_a": "a", "choice_b": "b",
                      "choice_c": "c", "choice_d": "d", "answer": "A", "data_id": "v.mp4",
                      "data_type": "video", "question_type_id": 10})  # fmt: skip
    _json(tmp_path / "SEED-Bench.json", {
        "question_type": {"Scene Understanding": 1, "Instances Counting": 5,
                          "Action Recognition": 10}, "questions": questions})  # fmt: skip
    records = read_benchmark(import_benchmark(
        "seed", [tmp_path / "SEED-Bench.json", tmp_path / "SEED-Bench-image"], tmp_path / "out"
    ))  # fmt: skip
    assert [r.extra["dimension"] for r in records] == ["Scene Understanding"] * 3 + [
        "Instances Counting"
    ] * 2
    scores = score(records, _letters(records, right={"1", "2", "4"}))
    assert scores["multiple_choice.accuracy"] == pytest.approx(3 / 5)  # eval.py's total
    assert scores["multiple_choice.accuracy_scene_understanding"] == pytest.approx(2 / 3)
    assert scores["multiple_choice.accuracy_instances_counting"] == pytest.approx(1 / 2)
    assert scores["multiple_choice.count_scene_understanding"] == 3.0
    assert not any("action" in name for name in scores)  # no video question was imported


def test_scienceqa_accuracy_by_subject_context_and_grade(tmp_path) -> None:
    """ScienceQA's tools/evaluate_acc.py groups: subject (natural / social / language), context
    (has_text: a non-empty hint; has_image; no_context: neither), grade 1-6 / 7-12. On the
    IMG split every problem has an image, so no_context never occurs."""
    from official_files import _image, _json

    from owl.eval.benchmarks import read_benchmark
    from owl.eval.importers import import_benchmark

    problems = {}
    for pid, subject, hint, grade in (("a", "natural science", "", "grade2"),
                                      ("b", "natural science", "A context.", "grade8"),
                                      ("c", "social science", "A context.", "grade5"),
                                      ("d", "language science", "", "grade11")):  # fmt: skip
        _image(tmp_path / f"images/test/{pid}/image.png", fmt="PNG")
        problems[pid] = {"question": "Q?", "choices": ["x", "y", "z"], "answer": 0,
                         "hint": hint, "image": "image.png", "task": "closed choice",
                         "grade": grade, "subject": subject, "topic": "t", "category": "c",
                         "skill": "s", "lecture": "", "solution": "", "split": "test"}  # fmt: skip
    problems["e"] = {**problems["a"], "image": None}  # no image: not in ScienceQA-IMG
    problems["f"] = {**problems["a"], "split": "train"}
    _json(tmp_path / "problems.json", problems)
    records = read_benchmark(import_benchmark(
        "scienceqa", [tmp_path / "problems.json", tmp_path / "images"], tmp_path / "out"
    ))  # fmt: skip
    assert [r.id for r in records] == ["a", "b", "c", "d"]
    assert records[1].extra["categories"] == ["natural", "has_text", "has_image", "grade_7_12"]
    scores = score(records, _letters(records, right={"a", "c"}))
    expected = {"accuracy": 2 / 4, "accuracy_natural": 1 / 2, "accuracy_social": 1.0,
                "accuracy_language": 0.0, "accuracy_has_text": 1 / 2, "accuracy_has_image": 2 / 4,
                "accuracy_grade_1_6": 1.0, "accuracy_grade_7_12": 0.0}  # fmt: skip
    for name, value in expected.items():
        assert scores[f"multiple_choice.{name}"] == pytest.approx(value), name
    assert "multiple_choice.accuracy_no_context" not in scores


def test_categories_must_be_a_list_of_strings(tmp_path) -> None:
    from owl.eval.benchmarks import read_benchmark

    path = tmp_path / "b.jsonl"
    path.write_text('{"id": "1", "type": "text", "question": "Q?", "answer": "a", '
                    '"categories": "science"}\n')  # fmt: skip
    with pytest.raises(ValueError, match="'categories' must be a list of non-empty strings"):
        read_benchmark(path)
