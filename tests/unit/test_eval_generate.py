"""The generation loop on a real (random) debug-tiny model and on scripted models: batched equals
one-by-one, prompts use the training template, circular multiple choice and the blank control
flow through to the scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import make_benchmarks, make_model, make_tokenizer
from torch import nn

from owl import IMAGE_TOKEN_ID
from owl.data.tokenizer import load_tokenizer
from owl.eval.benchmarks import BenchmarkRecord, read_benchmark
from owl.eval.generate import predict
from owl.eval.prompts import expand_queries, prompt_ids
from owl.eval.scoring import sample_score, score
from owl.model import get_config, load_model


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tokenizer_dir = make_tokenizer(root / "tokenizer")
    return {
        "tokenizer": tokenizer_dir,
        "model": make_model(root / "model", tokenizer_dir),
        **make_benchmarks(root / "bench"),
    }


@pytest.fixture(scope="module")
def records(artefacts: dict[str, Path]) -> list[BenchmarkRecord]:
    types = ("vqa", "caption", "multiple_choice", "yes_no", "text")
    return [r for t in types for r in read_benchmark(artefacts[t])]


class ScriptedModel(nn.Module):
    """Stands in for OwlModel: replies with a fixed text and records the images it was given."""

    def __init__(self, tokenizer, reply: str) -> None:
        super().__init__()
        self.cfg = get_config("debug-tiny")
        self.weight = nn.Parameter(torch.zeros(1))
        self.reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        self.seen_images: list[torch.Tensor] = []
        self.seen_prompts: list[list[int]] = []

    def generate(self, input_ids, images, *, max_new_tokens, **_options):
        self.seen_prompts.extend(input_ids)
        self.seen_images.extend(images or [])
        return [self.reply_ids[:max_new_tokens] for _ in input_ids]


def test_batched_predictions_equal_one_by_one(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    model = load_model(artefacts["model"]).eval()
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    budgets = {t: 6 for t in ("vqa", "caption", "multiple_choice", "yes_no", "text")}
    one_by_one = predict(model, tokenizer, records, batch_size=1, max_new_tokens_by_type=budgets)
    batched = predict(model, tokenizer, records, batch_size=5, max_new_tokens_by_type=budgets)
    assert len(batched) == len(expand_queries(records)) == 3 + 3 + 3 * 3 + 6 + 3
    assert batched == one_by_one
    assert any(p["num_new_tokens"] > 0 for p in batched)  # a real comparison, not of empties
    assert all(p["num_new_tokens"] <= 6 for p in batched)


def test_end_to_end_scores_on_tiny_model(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    model = load_model(artefacts["model"]).eval()
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    predictions = predict(model, tokenizer, records, batch_size=4)
    metrics = score(records, predictions, caption_meteor=False)
    for name in ("vqa.accuracy", "multiple_choice.circular_accuracy", "yes_no.accuracy_plus",
                 "text.accuracy", "caption.CIDEr", "multiple_choice.unparsed"):  # fmt: skip
        assert name in metrics
    assert metrics["multiple_choice.count"] == 3.0
    assert metrics["yes_no.count"] == 6.0
    assert 0.0 <= metrics["vqa.accuracy"] <= 1.0


def test_prompts_use_the_training_template(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    cfg = get_config("debug-tiny")
    ids = prompt_ids(tokenizer, records[0], variant="owl2", placeholder="<|image|>",
                     num_visual_tokens=cfg.num_visual_tokens)  # fmt: skip
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(IMAGE_TOKEN_ID) == cfg.num_visual_tokens
    text = tokenizer.decode([i for i in ids if i != IMAGE_TOKEN_ID], skip_special_tokens=True)
    # A byte-level BPE tokenizer (this one, as the demo's): the prompt ends as the training
    # template does, with no lone space before the reply (SentencePiece-style tokenizers, the
    # authors', end with "ASSISTANT: ": tests/unit/test_prompt_tokens.py).
    assert text == (
        "USER: What colour is the shape? Answer the question using a single word or phrase. "
        "ASSISTANT:"
    )


def test_position_biased_model_fails_circular(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    """A model that always answers "A" is right on the questions whose answer is A in the
    original order (1 of 3) and on none under circular evaluation."""
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    predictions = predict(ScriptedModel(tokenizer, "A"), tokenizer, records, batch_size=4)
    metrics = score(records, predictions, caption_meteor=False)
    assert metrics["multiple_choice.accuracy"] == pytest.approx(1 / 3)
    assert metrics["multiple_choice.circular_accuracy"] == 0.0
    assert metrics["multiple_choice.unparsed"] == 0.0
    assert metrics["yes_no.unparsed"] == 6.0  # "A" is neither yes nor no: wrong, not guessed
    assert metrics["vqa.accuracy"] == 0.0


def test_scripted_answers_are_scored_per_record(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    predictions = predict(ScriptedModel(tokenizer, "Red."), tokenizer, records, batch_size=3)
    by_id = {r.id: r for r in records}
    scores = {(p["id"], p["shift"]): sample_score(by_id[p["id"]], p) for p in predictions}
    assert scores[("v0", 0)] == 1.0 and scores[("v1", 0)] == 0.0  # v0 is red, v1 blue
    assert scores[("t0", 0)] == 1.0
    # m0 is red = option A: "Red." names option text "red", wherever the rotation put it.
    assert [scores[("m0", s)] for s in range(3)] == [1.0, 1.0, 1.0]
    metrics = score(records, predictions, caption_meteor=False)
    assert metrics["multiple_choice.circular_accuracy"] == pytest.approx(1 / 3)


def test_blank_images_replace_every_image(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    model = ScriptedModel(tokenizer, "red")
    predict(model, tokenizer, records, batch_size=4, blank_images=True)
    shown = torch.cat(model.seen_images)  # (N, 3, S, S)
    assert shown.shape[0] == 3 + 3 * 3 + 3 + 6  # vqa, mc rotations, caption, yes/no
    assert shown.abs().max() < 0.02  # the mean colour normalises to ~0

    model = ScriptedModel(tokenizer, "red")
    predict(model, tokenizer, records, batch_size=4)
    assert torch.cat(model.seen_images).abs().max() > 1.0  # real images are not blank


def test_owl1_prompt_uses_the_owl1_template(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    ids = prompt_ids(tokenizer, records[0], variant="owl1", placeholder="<image>",
                     num_visual_tokens=5)  # fmt: skip
    text = tokenizer.decode([i for i in ids if i != IMAGE_TOKEN_ID], skip_special_tokens=True)
    assert ids.count(IMAGE_TOKEN_ID) == 5
    assert text.endswith(
        "\nHuman: \nHuman: What colour is the shape? Answer the question using a single word or "
        "phrase.\nAI:"  # byte-level BPE: no lone space before the reply (see above)
    )


def test_prompt_longer_than_the_model_is_an_error(
    artefacts: dict[str, Path], records: list[BenchmarkRecord]
) -> None:
    tokenizer = load_tokenizer(artefacts["tokenizer"])
    model = ScriptedModel(tokenizer, "red")
    with pytest.raises(ValueError, match=r"vqa\.jsonl:1: .* exceed the model's 512 positions"):
        predict(model, tokenizer, records[:1], max_new_tokens_by_type={"vqa": 500})
