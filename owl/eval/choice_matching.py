"""Which option a multiple-choice reply picks, by one of two rules (`MATCHINGS`).

- "vlmevalkit": VLMEvalKit's exact matching (its `can_infer`, the answer extraction MMBench's
  owners score with when no judge model is used; read at open-compass/VLMEvalKit e8e78f0,
  vlmeval/utils/matching_util.py). Used for MMBench, SEED-Bench and ScienceQA, so their numbers
  compare with the leaderboards'. Its rules, in order:
  1. a known refusal sentence in the reply -> no option (VLMEvalKit's "Z", scored wrong);
  2. the reply with `.()[],:;!*#{}` turned into spaces, split into words: when exactly one
     option letter is a word, and its first occurrence is among the last four words, that
     letter; when no option letter is a word and "Z" is one, no option;
  3. "answer is X" / "correct answer is **X**" anywhere (case-insensitive, X one of A-D, so
     "the answer is a dog" reads as A): that letter if it is an option's;
  4. otherwise, if the reply is at most twice as long as all option texts together: the one
     option whose text occurs in the lower-cased reply ("It is blue." -> "blue"); none when
     several do (ambiguous) or none does.
  A reply none of these read gets no option, as VLMEvalKit's "exact_matching" policy scores it.
- "owl": the project's strict parser (`owl.eval.metrics.parse_choice`), which never guesses;
  the demo's and hand-written multiple-choice files use it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from owl.eval.metrics import LETTERS, parse_choice

MATCHINGS: tuple[str, ...] = ("owl", "vlmevalkit")

# Replies VLMEvalKit reads as a refusal (its reject_to_answer list), and its API-failure marker.
REFUSALS: tuple[str, ...] = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
REFUSED = "Z"  # VLMEvalKit's letter for "no option"
_LAST_WORDS = 4  # a lone letter counts only among the reply's last four words


def _letter(reply: str, letters: str) -> str | None:
    """Rules 1-3: an option letter, REFUSED, or None (fall through to the option texts)."""
    if API_FAILURE in reply:
        return None
    if any(refusal in reply for refusal in REFUSALS):
        return REFUSED
    words = _SEPARATORS.sub(" ", reply).split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1 and words.index(named[0]) >= len(words) - _LAST_WORDS:
        return named[0]
    if not named and REFUSED in words:
        return REFUSED
    found = _ANSWER_IS.search(reply)
    if found and found.group(1).upper() in letters:
        return found.group(1).upper()
    return None


def _option_text(reply: str, options: Sequence[str]) -> str | None:
    """Rule 4: the one option whose text occurs in a reply of bounded length."""
    text = reply.lower()
    if len(text) > 2 * sum(len(option) for option in options):
        return None
    found = [LETTERS[i] for i, option in enumerate(options) if option.lower() in text]
    return found[0] if len(found) == 1 else None


def vlmevalkit_letter(reply: str, options: Sequence[str]) -> str | None:
    """VLMEvalKit's `can_infer`: an option letter, REFUSED ("Z"), or None (not inferred)."""
    letters = LETTERS[: len(options)]
    return _letter(reply, letters) or _option_text(reply, options)


def match_choice(reply: str, options: Sequence[str], matching: str = "owl") -> int | None:
    """Index of the option `reply` picks under `matching` (MATCHINGS), None for no option."""
    if matching == "owl":
        return parse_choice(reply, options)
    if matching != "vlmevalkit":
        raise ValueError(f"unknown choice matching {matching!r}; use one of {MATCHINGS}")
    letter = vlmevalkit_letter(reply, options)
    return None if letter in (None, REFUSED) else LETTERS.index(letter)
