"""Conversation templates: exact rendering of Owl1 / Owl2 and the drop reasons of bad turns."""

from __future__ import annotations

import pytest

from owl.data.templates import (
    DropSample,
    Turn,
    caption_pieces,
    conversation_pieces,
    get_template,
    render,
)
from owl.model.variants import OWL1_SYSTEM

TURNS = [
    Turn("user", "<image>\nWhat colour is the circle?"),
    Turn("assistant", "Red."),
    Turn("user", "How many shapes?"),
    Turn("assistant", "Two."),
]


def _render(turns: list[Turn], variant: str, for_prompt: bool = False, **kw: str) -> str:
    template = get_template(variant, **kw)
    return render(conversation_pieces(turns, template, for_prompt=for_prompt), template)


def test_owl2_renders_the_reference_template() -> None:
    assert _render(TURNS, "owl2") == (
        "<s>USER: <|image|>\nWhat colour is the circle? ASSISTANT: Red.</s>"
        "USER: How many shapes? ASSISTANT: Two.</s>"
    )


def test_owl2_optional_system_prompt() -> None:
    assert _render(TURNS[:2], "owl2", system="Be brief.") == (
        "<s>Be brief. USER: <|image|>\nWhat colour is the circle? ASSISTANT: Red.</s>"
    )


def test_owl1_renders_image_lines_and_system_sentence() -> None:
    assert _render(TURNS, "owl1") == (
        f"<s>{OWL1_SYSTEM}\nHuman: <image>\nHuman: What colour is the circle?\nAI: Red.</s>"
        "\nHuman: How many shapes?\nAI: Two.</s>"
    )


def test_prompt_ends_with_the_assistant_prefix() -> None:
    assert _render(TURNS[:3], "owl2", for_prompt=True).endswith("USER: How many shapes? ASSISTANT:")
    assert _render(TURNS[:1], "owl1", for_prompt=True).endswith(
        "Human: What colour is the circle?\nAI:"
    )


def test_only_replies_and_their_turn_end_are_supervised() -> None:
    pieces = conversation_pieces(TURNS, get_template("owl2"), for_prompt=False)
    supervised = [(p.kind, p.text) for p in pieces if p.supervised]
    assert supervised == [("text", " Red."), ("eos", ""), ("text", " Two."), ("eos", "")]
    assert [p.kind for p in pieces].count("image") == 1


@pytest.mark.parametrize(
    "turns",
    [
        [],
        [Turn("assistant", "hi")],
        [Turn("user", "a"), Turn("user", "b"), Turn("assistant", "c")],
        [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c")],  # ends with the user
    ],
)
def test_non_alternating_conversations_are_dropped(turns: list[Turn]) -> None:
    with pytest.raises(DropSample) as info:
        conversation_pieces(turns, get_template("owl2"), for_prompt=False)
    assert info.value.reason == "not_alternating"


def test_placeholder_in_reply_is_dropped() -> None:
    turns = [Turn("user", "hi"), Turn("assistant", "look <|image|>")]
    with pytest.raises(DropSample) as info:
        conversation_pieces(turns, get_template("owl2"), for_prompt=False)
    assert info.value.reason == "placeholder_in_reply"


def test_caption_pieces() -> None:
    pieces = caption_pieces("  a red circle ")
    assert [(p.kind, p.text, p.supervised) for p in pieces] == [
        ("bos", "", False),
        ("image", "", False),
        ("text", "a red circle", True),
        ("eos", "", True),
    ]
    with pytest.raises(DropSample) as info:
        caption_pieces("   ")
    assert info.value.reason == "empty_caption"


def test_unknown_variant_names_the_choices() -> None:
    with pytest.raises(ValueError, match="owl1"):
        get_template("owl3")
