"""Scoring rules, each the standard one for its benchmark type, on plain strings.

- VQA: the official VQAv2 answer normalisation and the leave-one-annotator-out accuracy;
- captions: the COCO caption toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr;
- multiple choice: letter parsing that never guesses, plus circular evaluation (MMBench style);
- yes/no: accuracy and accuracy+ (MME style: both questions about one image right);
- text: exact match after normalisation, or the option letter.

Nothing here generates text or touches a model; `owl.eval.generate.score` feeds these.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
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


def _strip_punctuation(text: str) -> str:
    """Official rule: a mark touching a space, or any mark in a text with a "1,000"-style number,
    is deleted; any other mark becomes a space ("black/white" -> "black white")."""
    out = text
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if glued_number or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """VQAv2 answer normalisation: punctuation, lower case, number words -> digits, articles
    dropped, apostrophe-less contractions restored ("dont" -> "don't"), single spaces."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers: for each annotator left out,
    min(1, #other annotators who gave the normalised prediction / 3); averaged over annotators.

    The official script normalises the human answers only when they disagree (its answers were
    already normalised at collection); we always normalise both sides, which gives the same score
    on VQAv2 and the intended one on other data."""
    if not answers:
        raise ValueError("vqa_accuracy: no human answers given; a VQA record needs 10")
    predicted = normalize_answer(prediction)
    human = [normalize_answer(a) for a in answers]
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
# "The answer is B", "Answer: (C)", "option D", "correct choice is A." (letter must stand alone).
_NAMED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])(?![\w'])")
_LONE_LETTER = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def option_letter(index: int) -> str:
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} out of range: at most {len(LETTERS)} options")
    return LETTERS[index]


def parse_choice(reply: str, options: Sequence[str]) -> int | None:
    """Index of the option a reply picks, or None when it cannot be told without guessing.

    Accepted: a lone letter ("B", "(B)", "B."), a letter leading the reply ("B. red"), a letter
    named as the answer ("The answer is B"), or the reply being exactly one option's text (after
    VQA normalisation). Letters beyond the options, or several different letters, give None: an
    unparseable reply counts as wrong (the authors' scripts picked a random option instead)."""
    clean = reply.strip().strip("*`\"' ").strip()
    num_options = len(options)
    found = _LEADING_LETTER.match(clean)
    if found:
        letters = {found.group(1)}
    else:
        letters = set(_NAMED_LETTER.findall(clean))
        if letters:
            # "The answer is A, or maybe B": any other option letter in the reply makes it moot.
            letters |= {x for x in _LONE_LETTER.findall(clean) if LETTERS.index(x) < num_options}
    if len(letters) == 1:
        index = LETTERS.index(letters.pop())
        return index if index < num_options else None
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


def text_correct(reply: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """With options: the parsed option letter equals `answer` (a letter). Without: the reply
    equals the reference after VQA normalisation (case, punctuation, articles, number words)."""
    if options:
        predicted = parse_choice(reply, options)
        return predicted is not None and LETTERS[predicted] == answer
    return normalize_answer(reply) == normalize_answer(answer)


# ---------------------------------------------------------------------------------------------
# Captions: the COCO caption toolkit
# ---------------------------------------------------------------------------------------------


def java_available() -> bool:
    """PTB tokenisation and METEOR run Java (the jars ship with pycocoevalcap)."""
    return shutil.which("java") is not None


def _simple_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Fallback without Java: lower case, words and numbers only (close to, not equal to, PTB)."""
    return {
        key: [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", c.lower())) for c in caps]
        for key, caps in captions.items()
    }


def _ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize(
        {key: [{"caption": c} for c in caps] for key, caps in captions.items()}
    )


def caption_scores(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics x 100 (as papers report them): Bleu_1..4, ROUGE_L, CIDEr, and METEOR
    when `meteor` and Java is present. SPICE is never computed: at first use it downloads Stanford
    CoreNLP models, which cannot work offline. Without Java, captions are tokenised by a simple
    rule instead of the PTB tokenizer (numbers then differ slightly from the toolkit's)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(predictions):
        raise ValueError("caption_scores: references and predictions must have the same ids")
    if not references:
        raise ValueError("caption_scores: nothing to score")
    if any(not refs for refs in references.values()):
        raise ValueError("caption_scores: every id needs at least one reference caption")
    has_java = java_available()
    if not has_java:
        warnings.warn("java not found: simple caption tokenisation, no METEOR", stacklevel=2)
    tokenize = _ptb_tokenize if has_java else _simple_tokenize
    refs = tokenize(references)
    hyps = tokenize({key: [text] for key, text in predictions.items()})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"Bleu_{n}"] = 100.0 * value
    scores["ROUGE_L"] = 100.0 * float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr"] = 100.0 * float(Cider().compute_score(refs, hyps)[0])
    if meteor and has_java:
        scores["METEOR"] = 100.0 * _meteor(refs, hyps)
    scores["count"] = float(len(references))
    return scores


def _meteor(refs: dict[str, list[str]], hyps: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts a JVM that loads paraphrase tables (several seconds)
    try:
        return float(scorer.compute_score(refs, hyps)[0])
    finally:
        del scorer  # its __del__ stops the JVM
