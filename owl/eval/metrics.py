"""Scoring rules, each the standard one for its benchmark type, on plain strings.

- VQA: the official VQAv2 answer normalisation and the leave-one-annotator-out accuracy;
- captions: the COCO caption toolkit (pycocoevalcap), in owl.eval.caption_metrics;
- multiple choice: letter parsing that never guesses, plus circular evaluation (MMBench style);
- yes/no: accuracy and accuracy+ (MME style: both questions about one image right);
- text: exact match after normalisation, or the option letter.

Nothing here generates text or touches a model; `owl.eval.scoring.score` feeds these.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# VQA: normalisation and accuracy (the VQAv2 evaluation rules)
# ---------------------------------------------------------------------------------------------

# The official manual map of contractions written without their apostrophe.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A period not followed by a digit is removed ("3.5" keeps it, "dog." and "3." lose it). This is
# what the official regex does in effect (its intended look-behind was written as a look-ahead).
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official script passes re.UNICODE (= 32) where re.sub takes its `count`: at most 32 periods
# of an answer are removed, the rest stay. We reproduce that under the official rules.
OFFICIAL_MAX_PERIODS = 32

# VQA scoring rules (see vqa_accuracy and docs/benchmarks.md "VQA rules").
VQA_RULES: tuple[str, ...] = ("vqav2", "vizwiz", "normalized")
# The tokenizers owl.eval.caption_metrics runs captions through (PTB needs Java).
CAPTION_TOKENIZERS: tuple[str, ...] = ("ptb", "approx")


def _strip_punctuation(text: str, max_periods: int | None = None) -> str:
    """Official rule: a mark touching a space, or any mark in a text with a "1,000"-style number,
    is deleted; any other mark becomes a space ("black/white" -> "black white"). Periods not
    followed by a digit are removed: the first `max_periods` of them (None: all)."""
    out = text
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if glued_number or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=max_periods or 0)


def _digits_articles(text: str) -> str:
    """Lower case, number words -> digits, articles dropped, apostrophe-less contractions
    restored ("dont" -> "don't"), single spaces (the official processDigitArticle)."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str, max_periods: int | None = None) -> str:
    """VQAv2 answer normalisation: punctuation, lower case, number words -> digits, articles
    dropped, apostrophe-less contractions restored ("dont" -> "don't"), single spaces.
    `max_periods`: remove at most that many periods (the official scripts: 32)."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip(), max_periods)
    return _digits_articles(text)


def _official_human(answer: str, disagree: bool) -> str:
    """A human answer as the official VQAv2 script compares it: punctuation processed (only)
    when the ten answers disagree, otherwise left as written."""
    return _strip_punctuation(answer, OFFICIAL_MAX_PERIODS) if disagree else answer


def vqa_accuracy(prediction: str, answers: Sequence[str], rule: str = "vqav2") -> float:
    """VQA accuracy of one prediction against the human answers: for each annotator left out,
    min(1, #other annotators whose answer equals the prediction / 3); averaged over annotators.

    What "equals" means is the `rule`:
    - "vqav2" (default): the official VQAv2 script (GT-Vision-Lab/VQA vqaEval.py, and the
      mPLUG-Owl2 authors' copy, identical in this logic). The prediction is fully normalised
      (`normalize_answer`, at most 32 periods removed). The human answers are compared as
      written when all of them agree, and with only the punctuation step (no lower-casing,
      number words or articles) when they disagree; VQAv2/OK-VQA/TextVQA answers were
      normalised when collected, so this is meant to be a no-op there.
    - "vizwiz": VizWiz's script: prediction normalised as above, human answers as written.
    - "normalized": both sides fully normalised, every period: the rule for answers that were
      not normalised at collection (the demo's shapes benchmark, hand-written files)."""
    if not answers:
        raise ValueError("vqa_accuracy: no human answers given; a VQA record needs 10")
    if rule == "normalized":
        predicted = normalize_answer(prediction)
        human = [normalize_answer(a) for a in answers]
    elif rule in ("vqav2", "vizwiz"):
        predicted = normalize_answer(prediction, OFFICIAL_MAX_PERIODS)
        disagree = rule == "vqav2" and len(set(answers)) > 1
        human = [_official_human(a, disagree) for a in answers]
    else:
        raise ValueError(f"vqa_accuracy: unknown rule {rule!r}; use one of {VQA_RULES}")
    per_left_out = [
        min(1.0, sum(a == predicted for j, a in enumerate(human) if j != i) / 3.0)
        for i in range(len(human))
    ]
    return sum(per_left_out) / len(per_left_out)


# ---------------------------------------------------------------------------------------------
# Multiple choice: letter parsing (never guesses) and circular evaluation
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# "B", "(B)", "B.", "B)", "B:" alone, or "B. text" / "(B) text" / "B) text" / "B: text".
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)?[.:]?$|[.:)]\s|\)\s)")
# "B, text": a letter then a comma (the rest must not name another option letter).
_LEADING_COMMA = re.compile(r"^\(?([A-Z])\)?\s*,\s*(.*)$", re.DOTALL)
# "B blue": a letter, a space, then text (accepted only when the text is that option's own).
_LEADING_SPACE = re.compile(r"^([A-Z])\s+(.+)$", re.DOTALL)
# "The answer is B", "Answer: (C)", "option D", "correct choice is A." (letter must stand alone).
_NAMED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])(?![\w'])")
_LONE_LETTER = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
# Markdown emphasis and code marks ("**B**", "`B`", "__B__"): removed before parsing.
_MARKDOWN = re.compile(r"\*+|`+|(?<!\w)__|__(?!\w)")


def option_letter(index: int) -> str:
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} out of range: at most {len(LETTERS)} options")
    return LETTERS[index]


def _lone_option_letters(text: str, num_options: int) -> set[str]:
    return {x for x in _LONE_LETTER.findall(text) if LETTERS.index(x) < num_options}


def _reply_letters(clean: str, options: Sequence[str]) -> set[str]:
    """The option letters a reply names by the accepted forms (empty: none of them)."""
    num_options = len(options)
    found = _LEADING_LETTER.match(clean)
    if found:
        return {found.group(1)}
    found = _LEADING_COMMA.match(clean)
    if found:
        return {found.group(1)} | _lone_option_letters(found.group(2), num_options)
    found = _LEADING_SPACE.match(clean)
    if found:
        index = LETTERS.index(found.group(1))
        rest = normalize_answer(found.group(2))
        if index < num_options and rest and rest == normalize_answer(options[index]):
            return {found.group(1)}
    letters = set(_NAMED_LETTER.findall(clean))
    if letters:
        # "The answer is A, or maybe B": any other option letter in the reply makes it moot.
        letters |= _lone_option_letters(clean, num_options)
    return letters


def parse_choice(reply: str, options: Sequence[str]) -> int | None:
    """Index of the option a reply picks, or None when it cannot be told without guessing.

    Accepted, after markdown marks are removed ("**B**", "`B`"): a lone letter ("B", "(B)",
    "B."), a letter leading the reply ("B. red", "B) red", "B: red"), a letter and a comma
    ("B, red", unless another option letter follows), a letter followed by exactly that
    option's text ("B red" when B is "red"), a letter named as the answer ("The answer is B"),
    or the reply being exactly one option's text (after VQA normalisation). Letters beyond the
    options, several different letters, or free text give None: an unparseable reply counts as
    wrong (the authors' scripts picked a random option instead)."""
    clean = _MARKDOWN.sub("", reply).strip().strip("\"' ").strip()
    letters = _reply_letters(clean, options)
    if len(letters) == 1:
        index = LETTERS.index(letters.pop())
        return index if index < len(options) else None
    if letters:
        return None
    normalized = normalize_answer(clean)
    matches = [i for i, option in enumerate(options) if normalize_answer(option) == normalized]
    return matches[0] if normalized and len(matches) == 1 else None


def rotate_options(options: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
    """Options rotated left by `shift` and the index the correct answer moves to.

    Circular evaluation asks each question once per rotation: ([a, b, c], answer 0) with shift 1
    becomes ([b, c, a], answer 2)."""
    num_options = len(options)
    rotated = [options[(i + shift) % num_options] for i in range(num_options)]
    return rotated, (answer - shift) % num_options


@dataclass(frozen=True)
class ChoiceResult:
    """One asked rotation of one multiple-choice question."""

    question_id: str
    shift: int  # 0 = the options in their original order
    predicted: int | None  # None: the reply could not be parsed
    answer: int


def multiple_choice_scores(results: Sequence[ChoiceResult]) -> dict[str, float]:
    """accuracy (original order only), circular_accuracy (right under every rotation asked),
    unparsed (count over every asked rotation) and unparsed_rate."""
    if not results:
        raise ValueError("multiple_choice_scores: no results to score")
    by_question: dict[str, list[ChoiceResult]] = defaultdict(list)
    for result in results:
        by_question[result.question_id].append(result)
    originals = [r for r in results if r.shift == 0]
    if len(originals) != len(by_question):
        raise ValueError("multiple_choice_scores: every question needs its shift-0 result")
    num_unparsed = sum(r.predicted is None for r in results)
    circular = [all(r.predicted == r.answer for r in rs) for rs in by_question.values()]
    return {
        "accuracy": sum(r.predicted == r.answer for r in originals) / len(originals),
        "circular_accuracy": sum(circular) / len(circular),
        "unparsed": float(num_unparsed),
        "unparsed_rate": num_unparsed / len(results),
        "count": float(len(by_question)),
    }


# ---------------------------------------------------------------------------------------------
# Yes/no (MME style) and text
# ---------------------------------------------------------------------------------------------


def parse_yes_no(reply: str) -> str | None:
    """The reply's "yes" / "no": the first word if it is one, else the only one of the two that
    occurs; None when neither or both occur."""
    words = re.findall(r"[a-z]+", reply.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class YesNoResult:
    pair_id: str  # the questions asked about one image (MME asks one "yes" and one "no" each)
    predicted: str | None
    answer: str


def yes_no_scores(results: Sequence[YesNoResult]) -> dict[str, float]:
    """accuracy over questions, accuracy_plus over pairs (every question of the pair right),
    score = 100 * (accuracy + accuracy_plus) as MME reports per sub-task, and unparsed."""
    if not results:
        raise ValueError("yes_no_scores: no results to score")
    by_pair: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        by_pair[result.pair_id].append(result.predicted == result.answer)
    accuracy = sum(r.predicted == r.answer for r in results) / len(results)
    accuracy_plus = sum(all(v) for v in by_pair.values()) / len(by_pair)
    return {
        "accuracy": accuracy,
        "accuracy_plus": accuracy_plus,
        "score": 100.0 * (accuracy + accuracy_plus),
        "unparsed": float(sum(r.predicted is None for r in results)),
        "count": float(len(results)),
    }


# MME's own subtasks (its eval_tool/calculation.py, and the mPLUG-Owl2 authors' evaluate_mme.py).
MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip


def parse_yes_no_mme(reply: str) -> str | None:
    """MME's parser: the lower-cased reply if it is "yes" or "no", else "yes" if its first four
    characters contain "yes", else "no" if they contain "no", else None ("other")."""
    text = reply.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return None


@dataclass(frozen=True)
class MmeResult:
    category: str  # one of MME_PERCEPTION + MME_COGNITION
    image: str  # MME asks two questions per image (one "yes", one "no")
    predicted: str | None
    answer: str


def mme_scores(results: Sequence[MmeResult]) -> dict[str, float]:
    """MME as its owners score it: per subtask, acc (over questions) and acc_plus (over images,
    both questions right), score = 100 * (acc + acc_plus); `perception` and `cognition` are the
    sums of their subtasks' scores (the mPLUG-Owl2 paper's 1450.19 is the perception total).
    Subtasks absent from the results are left out of the totals and listed nowhere."""
    if not results:
        raise ValueError("mme_scores: no results to score")
    by_category: dict[str, list[MmeResult]] = defaultdict(list)
    for result in results:
        if result.category not in MME_PERCEPTION + MME_COGNITION:
            raise ValueError(
                f"mme_scores: unknown subtask {result.category!r}; MME's are "
                f"{MME_PERCEPTION + MME_COGNITION}"
            )
        by_category[result.category].append(result)
    scores: dict[str, float] = {"perception": 0.0, "cognition": 0.0}
    for category, items in by_category.items():
        by_image: dict[str, list[bool]] = defaultdict(list)
        for item in items:
            by_image[item.image].append(item.predicted == item.answer)
        acc = sum(r.predicted == r.answer for r in items) / len(items)
        acc_plus = sum(all(v) for v in by_image.values()) / len(by_image)
        score = 100.0 * (acc + acc_plus)
        scores[f"{category}.acc"] = acc
        scores[f"{category}.acc_plus"] = acc_plus
        scores[f"{category}.score"] = score
        scores["perception" if category in MME_PERCEPTION else "cognition"] += score
    scores["unparsed"] = float(sum(r.predicted is None for r in results))
    scores["count"] = float(len(results))
    return scores


def parse_yes_no_pope(reply: str) -> str:
    """POPE's parser (its evaluate.py): keep the text before the first period, drop commas, and
    answer "no" if the words include "No", "no" or "not", else "yes" (never unparsed)."""
    text = reply.split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_scores(predicted: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, f1 and
    yes_ratio (share of "yes" predictions)."""
    if not predicted or len(predicted) != len(answers):
        raise ValueError("pope_scores: give one prediction per answer (and at least one)")
    pairs = list(zip(predicted, answers))
    tp = sum(p == "yes" and a == "yes" for p, a in pairs)
    fp = sum(p == "yes" and a == "no" for p, a in pairs)
    tn = sum(p == "no" and a == "no" for p, a in pairs)
    fn = sum(p == "no" and a == "yes" for p, a in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
        "count": float(len(pairs)),
    }


def gqa_correct(reply: str, answer: str) -> bool:
    """GQA: exact match with the single reference answer. GQA's eval.py compares strings as
    given; the prediction is first lower-cased, stripped and freed of trailing periods, as
    LLaVA-1.5's convert_gqa_for_eval does (the mPLUG-Owl2 release has no GQA script)."""
    return reply.strip().rstrip(".").lower() == answer.strip()


def text_correct(reply: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """With options: the parsed option letter equals `answer` (a letter). Without: the reply
    equals the reference after VQA normalisation (case, punctuation, articles, number words)."""
    if options:
        predicted = parse_choice(reply, options)
        return predicted is not None and LETTERS[predicted] == answer
    return normalize_answer(reply) == normalize_answer(answer)
