"""Caption metrics through the COCO caption toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D, on PTB-tokenized captions (Java) as COCO's pipeline does, or on an approximate tokenizer
without Java (metrics then named `*_approx`). The other scoring rules are owl.eval.metrics.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

from owl.eval.metrics import CAPTION_TOKENIZERS


def java_available() -> bool:
    """PTB tokenisation and METEOR run Java (the jars ship with pycocoevalcap)."""
    return shutil.which("java") is not None


APPROX_SUFFIX = "_approx"


def _simple_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The approximate tokenizer (no Java): lower case, words and numbers only. Close to, not
    equal to, PTB: metrics computed with it carry the `_approx` suffix."""
    return {
        key: [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", c.lower())) for c in caps]
        for key, caps in captions.items()
    }


def _ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize(
        {key: [{"caption": c} for c in caps] for key, caps in captions.items()}
    )


JAVA_MISSING = (
    "caption metrics need Java for the PTB tokenizer (COCO's official pipeline): install it "
    "(e.g. apt-get install default-jre-headless), or ask for the approximate tokenizer "
    "(caption_tokenizer: approx / --caption-tokenizer approx; metrics are then named *_approx)"
)


def caption_scores(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    meteor: bool = True,
    tokenizer: str = "ptb",
) -> dict[str, float]:
    """COCO caption metrics x 100 (as papers report them): Bleu_1..4, ROUGE_L, CIDEr (CIDEr-D,
    pycocoevalcap's), and METEOR when `meteor`. Captions go through the PTB tokenizer (Java), as
    in COCO's pipeline; without Java this raises ValueError unless `tokenizer="approx"`, which
    uses a simple rule instead and names every metric with an `_approx` suffix (no METEOR).
    SPICE is never computed: at first use it downloads Stanford CoreNLP models (not offline)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"caption tokenizer {tokenizer!r}: use one of {CAPTION_TOKENIZERS}")
    if set(references) != set(predictions):
        raise ValueError("caption_scores: references and predictions must have the same ids")
    if not references:
        raise ValueError("caption_scores: nothing to score")
    if any(not refs for refs in references.values()):
        raise ValueError("caption_scores: every id needs at least one reference caption")
    refs, hyps = _tokenized(references, predictions, tokenizer)
    approx = tokenizer == "approx"
    suffix = APPROX_SUFFIX if approx else ""
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"Bleu_{n}{suffix}"] = 100.0 * value
    scores[f"ROUGE_L{suffix}"] = 100.0 * float(Rouge().compute_score(refs, hyps)[0])
    scores[f"CIDEr{suffix}"] = 100.0 * float(Cider().compute_score(refs, hyps)[0])
    if meteor and not approx:
        scores["METEOR"] = 100.0 * _meteor(refs, hyps)
    scores["count"] = float(len(references))
    return scores


def _tokenized(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], tokenizer: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """References and predictions through the PTB tokenizer (Java) or the approximate one."""
    approx = tokenizer == "approx"
    if not approx and not java_available():
        raise ValueError(JAVA_MISSING)
    tokenize = _simple_tokenize if approx else _ptb_tokenize
    return tokenize(references), tokenize({key: [text] for key, text in predictions.items()})


def cider_per_image(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], tokenizer: str = "ptb"
) -> dict[str, float]:
    """Each image's CIDEr-D x 100, document frequencies from all references: their mean is the
    corpus CIDEr of `caption_scores` (the per-item scores its bootstrap interval resamples)."""
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = _tokenized(references, predictions, tokenizer)
    _, per_image = Cider().compute_score(refs, hyps)
    return {key: 100.0 * float(value) for key, value in zip(refs, per_image)}


def _meteor(refs: dict[str, list[str]], hyps: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts a JVM that loads paraphrase tables (several seconds)
    try:
        return float(scorer.compute_score(refs, hyps)[0])
    finally:
        del scorer  # its __del__ stops the JVM
