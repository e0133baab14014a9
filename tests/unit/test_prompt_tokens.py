"""Benchmark prompts are token for token the authors' own.

The reference side is what the authors ran: their prompt strings (copied below from their scripts,
file named per case), tokenized as their code does it with LLaMA's SentencePiece tokenizer (the
`sentencepiece` library, as the slow LlamaTokenizer of their transformers 4.3x calls it). Our side
is `owl.eval.prompts.prompt_ids` with the same SentencePiece model loaded as owl loads a LLaMA
folder (converted to a fast tokenizer). The model is a small one trained here with LLaMA's
normalizer settings (dummy prefix, whitespace kept, byte fallback), so "ASSISTANT: " ends in "▁".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from owl import IMAGE_TOKEN_ID
from owl.data.tokenizer import load_tokenizer
from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.prompts import prompt_ids
from owl.model.variants import OWL1_SYSTEM

spm = pytest.importorskip("sentencepiece")

NUM_VISUAL = 3
OWL2_EVAL = "mPLUG-Owl2/mplug_owl2/evaluate/"  # in X-PLUG/mPLUG-Owl
# evaluate_vqa.py (VQAv2, OK-VQA, TextVQA)
VQA = "USER: <|image|>{} Answer the question using a single word or phrase. ASSISTANT: "
# evaluate_caption.py (COCO, Flickr30K, NoCaps)
CAPTION = "USER: <|image|>Provide a one-sentence caption for the provided image. ASSISTANT: "
# evaluate_mmbench.py: hint ('N/A' when empty), question, "A. x\nB. y" (U+2019 apostrophe)
MMBENCH = (
    "USER: <|image|>{}\n{}\n{}\nAnswer with the option\u2019s letter from the given choices "
    "directly. ASSISTANT: "
)
# evaluate_mme.py: the question with 'Please answer yes or no.' removed afterwards
MME = "USER: <|image|>{}\nAnswer the question using a single word or phrase. ASSISTANT: "
# mPLUG-Owl/README.md (Owl1 has no benchmark scripts; its README's prompt layout)
OWL1 = OWL1_SYSTEM + "\nHuman: <image>\nHuman: {}\nAI: "

CORPUS = [
    VQA.format("What colour is the dog?"),
    CAPTION,
    MMBENCH.format("N/A", "Which shape is red?", "A. circle\nB. square"),
    OWL1.format("Where is the cat?"),
    "Is there a red circle in the image? Please answer yes or no.",
] * 40


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece BPE model with LLaMA's settings, in a folder as LLaMA ships it."""
    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(out / "tokenizer"), vocab_size=500,
        model_type="bpe", add_dummy_prefix=True, remove_extra_whitespaces=False,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    return out


def _owl2_reference(sp: object, prompt: str) -> list[int]:
    """mplug_owl2/mm_utils.py tokenizer_image_token: each text chunk between "<|image|>" marks is
    tokenized on its own with BOS; the BOS is kept once, one image index per mark (expanded here
    to owl's visual slots)."""
    ids = [sp.bos_id()]
    for i, chunk in enumerate(prompt.split("<|image|>")):
        if i:
            ids += [IMAGE_TOKEN_ID] * NUM_VISUAL
        ids += sp.encode(chunk) if chunk else []
    return ids


def _owl1_reference(sp: object, prompt: str) -> list[int]:
    """mplug_owl/processing_mplug_owl.py _tokenize_prompt with add_BOS: BOS, then each text chunk
    between "<image>" marks tokenized on its own without special tokens, image slots between."""
    ids = [sp.bos_id()]
    for chunk in (c for c in re.split("(<image>)", prompt) if c):
        ids += [IMAGE_TOKEN_ID] * NUM_VISUAL if chunk == "<image>" else sp.encode(chunk)
    return ids


def _record(**fields: object) -> BenchmarkRecord:
    return BenchmarkRecord(id="1", source="test", images=("image.jpg",), **fields)  # type: ignore[arg-type]


CASES = [
    pytest.param(
        _record(type="vqa", prompt="short_answer", question="What colour is the dog?"),
        VQA.format("What colour is the dog?"),
        id="evaluate_vqa.py",
    ),
    pytest.param(
        _record(type="caption", prompt="coco_caption", references=("a dog",)),
        CAPTION,
        id="evaluate_caption.py",
    ),
    *(
        pytest.param(
            _record(
                type="multiple_choice",
                prompt="mmbench",
                question="Which shape is red?",
                hint=hint,
                options=options,
                answer="A",
            ),
            MMBENCH.format(
                hint or "N/A",
                "Which shape is red?",
                "\n".join(f"{'ABC'[i]}. {o}" for i, o in enumerate(options)),
            ),
            id=f"evaluate_mmbench.py-{'hint' if hint else 'no-hint'}",
        )
        for hint, options in (
            ("", ("circle", "square")),
            ("Two shapes.", ("circle", "square", "star")),
        )
    ),  # fmt: skip
    pytest.param(
        _record(
            type="yes_no",
            prompt="mme",
            answer="yes",
            pair_id="p",
            question="Is there a red circle in the image? Please answer yes or no.",
        ),  # fmt: skip
        MME.format("Is there a red circle in the image? Please answer yes or no.").replace(
            "Please answer yes or no.", ""
        ),
        id="evaluate_mme.py",
    ),
]


@pytest.mark.parametrize(("record", "authors_prompt"), CASES)
def test_owl2_prompt_ids_equal_the_authors_scripts(
    llama_like: Path, record: BenchmarkRecord, authors_prompt: str
) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(llama_like / "tokenizer.model"))
    tokenizer = load_tokenizer(llama_like)
    ours = prompt_ids(tokenizer, record, variant="owl2", placeholder="<|image|>",
                      num_visual_tokens=NUM_VISUAL)  # fmt: skip
    theirs = _owl2_reference(sp, authors_prompt)
    assert sp.id_to_piece(theirs[-1]) == "\u2581"  # the trailing space is a token of its own
    assert ours == theirs


def test_owl1_prompt_ids_equal_the_authors_layout(llama_like: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(llama_like / "tokenizer.model"))
    record = _record(type="vqa", prompt="short_answer", question="Where is the cat?")
    ours = prompt_ids(load_tokenizer(llama_like), record, variant="owl1", placeholder="<image>",
                      num_visual_tokens=NUM_VISUAL)  # fmt: skip
    question = "Where is the cat? Answer the question using a single word or phrase."
    assert ours == _owl1_reference(sp, OWL1.format(question))
