"""The prompts the authors evaluated with, one per benchmark type, as conversation turns.

The user text is wrapped by `owl.data.templates` through `encode_prompt`, the same template the
model was trained with, so "USER: <|image|>{q} Answer the question using a single word or phrase.
ASSISTANT:" (owl2) comes out token for token as in training. Decoding is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from owl.data.templates import Turn
from owl.data.tokenize import encode_prompt
from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.metrics import LETTERS

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please answer yes or no."

# Generation budgets per type (the authors' scripts: 10 for short answers and letters).
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "vqa": 10,
    "caption": 30,
    "multiple_choice": 10,
    "yes_no": 10,
    "text": 64,
}


def choice_block(question: str, options: Sequence[str], hint: str = "") -> str:
    """Hint, question, lettered options and the letter instruction, one per line."""
    lines = [hint] if hint.strip() else []
    lines.append(question)
    lines.extend(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


def question_text(record: BenchmarkRecord, options: Sequence[str] | None = None) -> str:
    """The user's words for a record (no image placeholders). `options` overrides the record's
    own (a rotation, for circular multiple choice)."""
    options = record.options if options is None else options
    if record.type == "vqa":
        return f"{record.question} {VQA_INSTRUCTION}"
    if record.type == "caption":
        return CAPTION_PROMPT
    if record.type == "multiple_choice":
        return choice_block(record.question, options, record.hint)
    if record.type == "yes_no":
        if record.question.rstrip().endswith(YES_NO_INSTRUCTION):
            return record.question  # MME questions already carry it
        return f"{record.question} {YES_NO_INSTRUCTION}"
    if options:  # text with options (MMLU style)
        return choice_block(record.question, options, record.hint)
    return record.question


def prompt_turns(
    record: BenchmarkRecord, placeholder: str, options: Sequence[str] | None = None
) -> list[Turn]:
    """One user turn: an image placeholder per image, then the question (as the authors did)."""
    return [Turn("user", placeholder * len(record.images) + question_text(record, options))]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    record: BenchmarkRecord,
    *,
    variant: str,
    placeholder: str,
    num_visual_tokens: int,
    options: Sequence[str] | None = None,
) -> list[int]:
    """Token ids to generate from, image placeholders expanded to `num_visual_tokens` slots."""
    return encode_prompt(
        tokenizer,
        prompt_turns(record, placeholder, options),
        variant=variant,
        num_visual_tokens=num_visual_tokens,
    )
