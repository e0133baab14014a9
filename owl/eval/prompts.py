"""The prompts and generation budgets used for each benchmark, in ONE table (`PROMPTS`).

Each record names its prompt style (`record.prompt`, set by the importers); a record without one
uses its type's own style (the first five rows: the project's generic prompts, which the demo's
shapes benchmarks use). Every row says where its text and budget come from; rows that deviate
from the authors say why. docs/benchmarks.md prints this table.

The user text is wrapped by `owl.data.templates` through `encode_prompt`, the template the model
was trained with, and, under a SentencePiece-style tokenizer (the authors'), ends with `PROMPT_END`,
so "USER: <|image|>{q} Answer the question using a single word or phrase. ASSISTANT: " (owl2)
comes out token for token as the authors' scripts tokenize it (tests/unit/test_prompt_tokens.py);
under any other tokenizer (the demo's byte-level BPE) it ends as the training template does
(`prompt_end`). Decoding is greedy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from owl.data.templates import Turn
from owl.data.tokenize import encode_prompt
from owl.data.video import DEFAULT_NUM_FRAMES
from owl.eval.benchmarks import BenchmarkRecord
from owl.eval.metrics import LETTERS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# The authors' MMBench script writes the apostrophe as U+2019; their tokenizer sees that byte.
CHOICE_INSTRUCTION_OWL2_MMBENCH = (
    "Answer with the option\u2019s letter from the given choices directly."
)
YES_NO_INSTRUCTION = "Please answer yes or no."

# Every mPLUG-Owl2 evaluate script ends its prompt with "ASSISTANT: " (and Owl1's README prompts
# with "AI: "): the trailing space becomes one more token ("▁" under LLaMA's tokenizer) before the
# reply. Chat (`owl chat`) ends at "ASSISTANT:" as the authors' own chat code does.
PROMPT_END = " "


def prompt_end(tokenizer: PreTrainedTokenizerBase) -> str:
    """PROMPT_END for a SentencePiece-style tokenizer (words start with "▁": the authors' LLaMA
    tokenizer and its kin), whose ids then equal the authors' scripts' token for token; "" for
    any other kind (a byte-level BPE such as the demo's). There a lone space before the reply is
    a token the model never saw in training (its replies' first word carries the space), and
    appending it collapsed the demo's held-out VQA from 0.94 to 0.20: the prompt ends as the
    training template does."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a b", add_special_tokens=False))
    return PROMPT_END if any(p.startswith("\u2581") for p in pieces) else ""


OWL2_EVAL = "X-PLUG/mPLUG-Owl: mPLUG-Owl2/mplug_owl2/evaluate/"
OWL1_NOTE = "Owl1: same text in Owl1's template (the Owl1 release has no benchmark scripts)"


@dataclass(frozen=True)
class PromptSpec:
    """User text (fields: {question}, {hint}, {options} = "A. x\\nB. y"), the generation budget,
    where both come from, and why we deviate where we do."""

    text: str
    max_new_tokens: int
    source: str
    deviation: str = ""
    hint_default: str = ""  # the hint line when a record has none ("" = no hint line)
    drop: str = ""  # removed from the question first (MME's own yes/no instruction)
    # How a multiple-choice reply is read (owl.eval.choice_matching.MATCHINGS).
    matching: str = "owl"


PROMPTS: dict[str, PromptSpec] = {
    # The type defaults: the project's generic prompts; the demo's benchmarks use these.
    "vqa": PromptSpec(
        "{question} " + VQA_INSTRUCTION, 10, OWL2_EVAL + "evaluate_vqa.py (text and budget)"
    ),
    "caption": PromptSpec(
        CAPTION_PROMPT,
        30,
        OWL2_EVAL + "evaluate_caption.py (text)",
        "30 new tokens, not the authors' 60: the demo's captions are short and its metrics were "
        "measured with 30 (use style coco_caption for the authors' budget)",
    ),
    "multiple_choice": PromptSpec(
        "{hint}\n{question}\n{options}\n" + CHOICE_INSTRUCTION,
        10,
        OWL2_EVAL + "evaluate_mmbench.py (layout and budget)",
        "no hint line when the record has none and a plain apostrophe: the demo's prompt (use "
        "style mmbench for the authors' exact text)",
    ),
    "yes_no": PromptSpec(
        "{question} " + YES_NO_INSTRUCTION,
        10,
        "project prompt (no authors' script)",
        "not repeated when the question already ends with it",
    ),
    "text": PromptSpec("{question}", 64, "project prompt (text-only questions)"),
    # Per benchmark: the authors' text and budget where their scripts exist.
    "short_answer": PromptSpec(
        "{question} " + VQA_INSTRUCTION,
        10,
        OWL2_EVAL + "evaluate_vqa.py (VQAv2, OK-VQA, TextVQA)",
        "GQA, VizWiz, POPE: no authors' script; the same short-answer prompt",
    ),
    "coco_caption": PromptSpec(
        CAPTION_PROMPT,
        60,
        OWL2_EVAL + "evaluate_caption.py (COCO, Flickr30K, NoCaps)",
        "the authors also force at least 8 new tokens (min_new_tokens=8); we do not",
    ),
    "mmbench": PromptSpec(
        "{hint}\n{question}\n{options}\n" + CHOICE_INSTRUCTION_OWL2_MMBENCH,
        10,
        OWL2_EVAL + "evaluate_mmbench.py (hint 'N/A' when missing)",
        hint_default="N/A",
        matching="vlmevalkit",
    ),
    "mme": PromptSpec(
        "{question}\n" + VQA_INSTRUCTION,
        10,
        OWL2_EVAL + "evaluate_mme.py ('Please answer yes or no.' removed, short-answer suffix)",
        drop=YES_NO_INSTRUCTION,
    ),
    "seed": PromptSpec(
        "{question}\n{options}\n" + CHOICE_INSTRUCTION,
        10,
        "no authors' script; the multiple-choice layout of evaluate_mmbench.py without a hint",
        matching="vlmevalkit",
    ),
    "scienceqa": PromptSpec(
        "{hint}\n{question}\n{options}\n" + CHOICE_INSTRUCTION,
        10,
        "no authors' script; the multiple-choice layout of evaluate_mmbench.py, context as hint",
        "no hint line when the problem has no context",
        matching="vlmevalkit",
    ),
}

# Budgets per record type for records without a style (the type rows above).
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    t: PROMPTS[t].max_new_tokens for t in ("vqa", "caption", "multiple_choice", "yes_no", "text")
}


def style_of(record: BenchmarkRecord) -> str:
    return record.prompt or record.type


def spec_of(record: BenchmarkRecord) -> PromptSpec:
    style = style_of(record)
    if style not in PROMPTS:
        raise ValueError(
            f"{record.source}: field 'prompt' is {style!r}; use one of {sorted(PROMPTS)}"
        )
    return PROMPTS[style]


def max_new_tokens(record: BenchmarkRecord, overrides: Mapping[str, int] | None = None) -> int:
    """The record's budget: a per-type override if given, else its prompt style's."""
    if overrides and record.type in overrides:
        return int(overrides[record.type])
    return spec_of(record).max_new_tokens


def choice_block(question: str, options: Sequence[str], hint: str = "") -> str:
    """Hint, question, lettered options and the letter instruction, one per line."""
    return _fill(PROMPTS["multiple_choice"], question, options, hint)


def _fill(spec: PromptSpec, question: str, options: Sequence[str], hint: str) -> str:
    if spec.drop:
        question = question.replace(spec.drop, "")
    hint = hint if hint.strip() else spec.hint_default
    text = spec.text
    if not hint and text.startswith("{hint}\n"):
        text = text.removeprefix("{hint}\n")
    lettered = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return text.format(question=question, hint=hint, options=lettered)


def question_text(record: BenchmarkRecord, options: Sequence[str] | None = None) -> str:
    """The user's words for a record (no image placeholders). `options` overrides the record's
    own (a rotation, for circular multiple choice)."""
    options = record.options if options is None else options
    style = style_of(record)
    if style == "yes_no" and record.question.rstrip().endswith(YES_NO_INSTRUCTION):
        return record.question  # the question already carries it
    if style == "text" and options:  # text with options (MMLU style)
        return choice_block(record.question, options, record.hint)
    return _fill(spec_of(record), record.question, options, record.hint)


def prompt_turns(
    record: BenchmarkRecord,
    placeholder: str,
    options: Sequence[str] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> list[Turn]:
    """One user turn: an image placeholder per image and per frame of each video (`num_frames`
    a video), then the question (as the authors did)."""
    num_slots = len(record.images) + num_frames * len(record.videos)
    return [Turn("user", placeholder * num_slots + question_text(record, options))]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    record: BenchmarkRecord,
    *,
    variant: str,
    placeholder: str,
    num_visual_tokens: int,
    options: Sequence[str] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> list[int]:
    """Token ids to generate from, image placeholders expanded to `num_visual_tokens` slots."""
    return encode_prompt(
        tokenizer,
        prompt_turns(record, placeholder, options, num_frames),
        variant=variant,
        num_visual_tokens=num_visual_tokens,
        end=prompt_end(tokenizer),
    )


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
