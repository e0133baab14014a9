"""The tokenizer itself: a Hugging Face tokenizer folder loaded and checked (`load_tokenizer`), or a
small byte-level BPE trained from texts (`train_bpe_tokenizer`, the demo's). Encoding text with it
is owl.data.tokenize. transformers is imported inside the functions (Ray workers never need it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from owl.data.tokenize import BOS, EOS, UNK, _encoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer folder (LLaMA style: BOS, EOS, pad = unk when none is set)."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise ValueError(
            f"{path}: no tokenizer.json or tokenizer.model; expected a HF tokenizer folder"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _encoder(tokenizer)  # validate now (fast tokenizer, BOS/EOS) rather than at first use
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (<unk>=0, <s>=1, </s>=2, pad=<unk>) and save it as a HF folder.

    Byte-level: every string is representable, so <unk> never appears in practice. No prefix
    space is added: a piece's own spaces are what gets tokenized.
    """
    from transformers import PreTrainedTokenizerFast

    num_specials = 3
    if vocab_size < 256 + num_specials:
        raise ValueError(f"vocab_size {vocab_size} is below 259 (256 bytes + 3 special tokens)")
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=UNK,
        add_bos_token=False,
        add_eos_token=False,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
