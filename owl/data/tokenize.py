"""Tokenization of captions and conversations into (input_ids, labels), and the tokenizer itself.

Every template piece (`owl.data.templates.Piece`) is encoded on its own and the results are
concatenated: the label of each token is known from its piece, so the loss mask is exact by
construction and there is no "rendered length != tokenized length" case to paper over.

- Image placeholders become `num_visual_tokens` copies of `IMAGE_TOKEN_ID` *before* truncation, so
  no sequence exceeds `max_length`. Truncation never leaves part of an image run: a run cut by the
  limit is removed with its image (`Encoded.num_images` says how many images remain).
- Text inside a piece is tokenized with special-token matching off: a literal "</s>" typed in a
  user message is text, not a fake turn end.
- Tokenizers that prepend a space marker themselves (SentencePiece / Metaspace, as LLaMA's) get a
  piece's single leading space removed first, so " {reply}" tokenizes as the word it is.
- Batched functions encode all pieces of a batch in one call to the Rust tokenizer.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.data.templates import (
    DropSample,
    Piece,
    Turn,
    caption_pieces,
    conversation_pieces,
    count_placeholders,
    get_template,
)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


@dataclass
class Encoded:
    input_ids: list[int]  # (T,) with image runs of IMAGE_TOKEN_ID
    labels: list[int]  # (T,) IGNORE_INDEX where no loss is taken
    num_images: int  # images whose runs are in input_ids (after truncation), in order
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class _PieceEncoder:
    """Encodes text pieces with the tokenizer's Rust backend, special-token matching off."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; owl needs a Hugging Face "
                "folder with tokenizer.json (convert a SentencePiece model with transformers first)"
            )
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer defines no BOS or EOS token; set bos_token/eos_token")
        self.bos_id: int = tokenizer.bos_token_id
        self.eos_id: int = tokenizer.eos_token_id
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = True
        self.strip_leading_space = _prepends_space_marker(self.backend)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.strip_leading_space:
            texts = [t[1:] if t.startswith(" ") else t for t in texts]
        return [enc.ids for enc in self.backend.encode_batch_fast(texts, add_special_tokens=False)]


def _prepends_space_marker(backend: Tokenizer) -> bool:
    """True when the tokenizer turns "a" into "<marker>a" itself (SentencePiece dummy prefix)."""
    text = "a"
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is not None:
        text = "".join(part for part, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return len(text) > 1 and text.endswith("a")


_ENCODERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, _PieceEncoder] = (
    weakref.WeakKeyDictionary()
)


def _encoder(tokenizer: PreTrainedTokenizerBase) -> _PieceEncoder:
    if tokenizer not in _ENCODERS:
        _ENCODERS[tokenizer] = _PieceEncoder(tokenizer)
    return _ENCODERS[tokenizer]


def _assemble(
    pieces: list[Piece],
    text_ids: Iterable[list[int]],
    encoder: _PieceEncoder,
    num_visual_tokens: int,
    max_length: int | None,
    require_supervised: bool = True,
) -> Encoded:
    """Concatenate encoded pieces, label them, truncate without splitting an image run."""
    text_iter = iter(text_ids)
    input_ids: list[int] = []
    labels: list[int] = []
    image_runs: list[tuple[int, int]] = []  # [start, end) of each image run in input_ids
    first_supervised = -1
    for piece in pieces:
        if piece.kind == "text":
            ids = next(text_iter)
        elif piece.kind == "image":
            image_runs.append((len(input_ids), len(input_ids) + num_visual_tokens))
            ids = [IMAGE_TOKEN_ID] * num_visual_tokens
        else:
            ids = [encoder.bos_id if piece.kind == "bos" else encoder.eos_id]
        if piece.supervised and first_supervised < 0 and ids:
            first_supervised = len(input_ids)
        input_ids.extend(ids)
        labels.extend(ids if piece.supervised else [IGNORE_INDEX] * len(ids))
    assert len(input_ids) == len(labels)

    cut = len(input_ids) if max_length is None else min(len(input_ids), max_length)
    for start, end in image_runs:
        if start < cut < end:
            cut = start  # never keep part of an image: drop the whole run
    if require_supervised and not 0 <= first_supervised < cut:
        raise DropSample("no_supervised_tokens", f"{len(input_ids)} tokens, limit {max_length}")
    return Encoded(
        input_ids=input_ids[:cut] if cut < len(input_ids) else input_ids,
        labels=labels[:cut] if cut < len(labels) else labels,
        num_images=sum(1 for _, end in image_runs if end <= cut),
        truncated=cut < len(input_ids),
    )


def encode_pieces_batch(
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[list[Piece] | DropSample],
    *,
    num_visual_tokens: int,
    max_length: int | None,
) -> list[Encoded | DropSample]:
    """Encode many piece lists with one tokenizer call; DropSample entries pass through."""
    encoder = _encoder(tokenizer)
    texts = [
        p.text
        for pieces in batch
        if not isinstance(pieces, DropSample)
        for p in pieces
        if p.kind == "text"
    ]
    text_ids = iter(encoder.encode(texts))
    out: list[Encoded | DropSample] = []
    for pieces in batch:
        if isinstance(pieces, DropSample):
            out.append(pieces)
            continue
        num_texts = sum(1 for p in pieces if p.kind == "text")
        own_ids = [next(text_ids) for _ in range(num_texts)]
        try:
            out.append(_assemble(pieces, own_ids, encoder, num_visual_tokens, max_length))
        except DropSample as drop:
            out.append(drop)
    return out


def _training_pieces(
    turns: list[Turn], variant: str, num_images: int | None, system: str | None
) -> list[Piece]:
    if num_images is not None:
        num_placeholders = sum(count_placeholders(t.text) for t in turns)
        if num_placeholders != num_images:
            raise DropSample(
                "placeholder_image_mismatch",
                f"{num_placeholders} placeholders, {num_images} images",
            )
    for turn in turns:
        if turn.role == "assistant" and not turn.text.strip():
            raise DropSample("empty_reply")
    return conversation_pieces(turns, get_template(variant, system), for_prompt=False)


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[tuple[list[Turn], int | None]],
    *,
    variant: str,
    num_visual_tokens: int,
    max_length: int,
    system: str | None = None,
) -> list[Encoded | DropSample]:
    """Batched `encode_conversation`: `samples` are (turns, number of images or None)."""
    batch: list[list[Piece] | DropSample] = []
    for turns, num_images in samples:
        try:
            batch.append(_training_pieces(turns, variant, num_images, system))
        except DropSample as drop:
            batch.append(drop)
    return encode_pieces_batch(
        tokenizer, batch, num_visual_tokens=num_visual_tokens, max_length=max_length
    )


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[Turn],
    *,
    variant: str,
    num_visual_tokens: int,
    max_length: int,
    num_images: int | None = None,
    system: str | None = None,
) -> Encoded:
    """A training sample: loss on assistant replies and their `</s>`. Raises DropSample.

    `num_images`, when given, must equal the number of placeholders in the user turns.
    `system` replaces the variant's default system prompt ("" removes it).
    """
    [result] = encode_conversations(
        tokenizer,
        [(turns, num_images)],
        variant=variant,
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
        system=system,
    )
    if isinstance(result, DropSample):
        raise result
    return result


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[Turn],
    *,
    variant: str,
    num_visual_tokens: int,
    system: str | None = None,
) -> list[int]:
    """Token ids to generate from: the conversation so far (ending with a user turn) and the
    assistant prefix. Equal to the prefix of the training encoding of the same conversation.
    Raises DropSample (a ValueError) for a conversation that does not alternate."""
    pieces = conversation_pieces(turns, get_template(variant, system), for_prompt=True)
    encoder = _encoder(tokenizer)
    text_ids = encoder.encode([p.text for p in pieces if p.kind == "text"])
    encoded = _assemble(
        pieces, text_ids, encoder, num_visual_tokens, max_length=None, require_supervised=False
    )
    return encoded.input_ids


def encode_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    *,
    num_visual_tokens: int,
    max_length: int,
) -> list[Encoded | DropSample]:
    """Batched `encode_caption`."""
    batch: list[list[Piece] | DropSample] = []
    for caption in captions:
        try:
            batch.append(caption_pieces(caption))
        except DropSample as drop:
            batch.append(drop)
    return encode_pieces_batch(
        tokenizer, batch, num_visual_tokens=num_visual_tokens, max_length=max_length
    )


def encode_caption(
    tokenizer: PreTrainedTokenizerBase, caption: str, *, num_visual_tokens: int, max_length: int
) -> Encoded:
    """Stage-1 sample: BOS, image run, caption, EOS; loss on the caption and EOS."""
    [result] = encode_captions(
        tokenizer, [caption], num_visual_tokens=num_visual_tokens, max_length=max_length
    )
    if isinstance(result, DropSample):
        raise result
    return result


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer folder (LLaMA style: BOS, EOS, pad = unk when none is set)."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise ValueError(
            f"{path}: no tokenizer.json or tokenizer.model; expected a HF tokenizer folder"
        )
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
