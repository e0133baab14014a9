"""Conversations as lists of pieces, in the layout of a model variant's `Template` (the templates
themselves are data of the variants, owl.model.variants).

A template turns a conversation into an ordered list of `Piece`s: BOS, text, image slots and EOS,
each marked supervised or not. Tokenization (`owl.data.tokenize`) encodes every piece on its own
and concatenates, so the loss mask is exact by construction. Training, evaluation and chat all
build their token ids from here, so the prompt a model sees at inference is token-for-token the
prefix it saw in training.

owl2:  <s>[system ]USER: <|image|>{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
owl1:  <s>{system}\nHuman: <image>\nHuman: {q}\nAI: {a}</s>\nHuman: {q2}\nAI: {a2}</s>

Loss covers the assistant replies and their turn-end `</s>` only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from owl.model.variants import VARIANTS, Template, get_variant

Role = Literal["user", "assistant"]
PieceKind = Literal["bos", "text", "image", "eos"]

# Every variant's placeholder spelling is accepted in any variant's data; each renders as the
# variant's own.
PLACEHOLDERS = tuple(dict.fromkeys(v.template.placeholder for v in VARIANTS.values()))
PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))


class DropSample(ValueError):
    """A sample that cannot be used as is; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


class Piece(NamedTuple):  # a NamedTuple: millions are built per tokenize step
    kind: PieceKind
    text: str = ""
    supervised: bool = False


def get_template(variant: str, system: str | None = None) -> Template:
    """The template of `variant`; `system` replaces its default system prompt ("" removes it)."""
    template = get_variant(variant).template
    if system is None:
        return template
    return dataclasses.replace(template, system=system)


def count_placeholders(text: str) -> int:
    return len(PLACEHOLDER_RE.findall(text))


def check_turns(turns: list[Turn], *, ends_with: Role) -> None:
    """Raise DropSample("not_alternating") unless turns go user, assistant, ... ending with `ends_with`."""
    if not turns:
        raise DropSample("not_alternating", "empty conversation")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise DropSample("not_alternating", f"turn {i} is {turn.role!r}, expected {expected!r}")
    if turns[-1].role != ends_with:
        raise DropSample(
            "not_alternating", f"last turn is {turns[-1].role!r}, expected {ends_with!r}"
        )


class _Builder:
    """Accumulates pieces, merging adjacent text of the same supervision into one piece."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def text(self, text: str, supervised: bool = False) -> None:
        if not text:
            return
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last.kind == "text" and last.supervised == supervised:
            self.pieces[-1] = Piece("text", last.text + text, supervised)
        else:
            self.pieces.append(Piece("text", text, supervised))

    def text_with_images(self, text: str) -> None:
        """Unsupervised text where each placeholder becomes an image piece."""
        parts = PLACEHOLDER_RE.split(text)
        for i, part in enumerate(parts):
            if i > 0:
                self.pieces.append(Piece("image"))
            self.text(part)

    def special(self, kind: PieceKind, supervised: bool = False) -> None:
        self.pieces.append(Piece(kind, supervised=supervised))


def _user_turn(builder: _Builder, template: Template, text: str) -> None:
    if template.image_line:
        # owl1: leading images each get their own "Human: <image>" line, then the question.
        stripped = text.lstrip()
        while (match := PLACEHOLDER_RE.match(stripped)) is not None:
            builder.text_with_images(template.image_line)
            stripped = stripped[match.end() :].lstrip()
        text = stripped
    builder.text_with_images(template.user_prefix + text)
    builder.text(template.assistant_prefix)


def conversation_pieces(turns: list[Turn], template: Template, *, for_prompt: bool) -> list[Piece]:
    """Pieces of a conversation: a full training sample, or (`for_prompt`) the prompt to generate from.

    Training turns must end with the assistant; prompt turns with the user, and the pieces then end
    with the assistant prefix ("ASSISTANT:" / "AI:") so the model continues with the reply.
    """
    check_turns(turns, ends_with="user" if for_prompt else "assistant")
    builder = _Builder()
    builder.special("bos")
    if template.system:
        builder.text(template.system + template.system_sep)
    for turn in turns:
        if turn.role == "user":
            _user_turn(builder, template, turn.text)
            continue
        if count_placeholders(turn.text):
            raise DropSample("placeholder_in_reply", "image placeholders belong in user turns")
        builder.text(template.reply_sep + turn.text.strip(), supervised=True)
        builder.special("eos", supervised=True)
    return builder.pieces


def caption_pieces(caption: str) -> list[Piece]:
    """Stage-1 sample: BOS, one image, the caption and EOS; loss on the caption and EOS."""
    caption = caption.strip()
    if not caption:
        raise DropSample("empty_caption")
    return [_BOS, _IMAGE, Piece("text", caption, supervised=True), _SUPERVISED_EOS]


_BOS, _IMAGE, _SUPERVISED_EOS = Piece("bos"), Piece("image"), Piece("eos", supervised=True)


def render(pieces: list[Piece], template: Template, bos: str = "<s>", eos: str = "</s>") -> str:
    """The pieces as one string (placeholders in the template's spelling): for logs and tests."""
    spelled = {"bos": bos, "eos": eos, "image": template.placeholder}
    return "".join(p.text if p.kind == "text" else spelled[p.kind] for p in pieces)
