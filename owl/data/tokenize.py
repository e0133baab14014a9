"""Tokenization of captions and conversations into (input_ids, labels); loading and training the
tokenizer itself is owl.data.tokenizer.

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
- Batched functions encode all pieces of a batch in one call to the Rust tokenizer, then build the
  token ids, labels and truncation of the whole batch with numpy (`assemble`), no per-sample
  Python loop; the result (`EncodedBatch`) is flat arrays that go into Arrow as they are.
- Ray workers encode from an `EncoderSpec` (the serialized Rust tokenizer and BOS/EOS ids) and
  never import transformers or torch; the driver builds the spec from the loaded tokenizer.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.data.templates import (
    DropSample,
    Piece,
    Turn,
    conversation_pieces,
    count_placeholders,
    get_template,
)

if TYPE_CHECKING:  # transformers (and torch behind it) is imported on use: Ray workers skip it
    from transformers import PreTrainedTokenizerBase

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


@dataclass(frozen=True)
class EncoderSpec:
    """What encoding needs of a tokenizer, small and picklable: Ray workers build a `PieceEncoder`
    from it with `tokenizers` alone, without importing transformers (and torch)."""

    backend_json: str  # the Rust tokenizer, serialized
    bos_id: int
    eos_id: int
    key: str  # sha256 of the above: the per-process cache key

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> EncoderSpec:
        from transformers import PreTrainedTokenizerFast

        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; owl needs a Hugging Face "
                "folder with tokenizer.json (convert a SentencePiece model with transformers first)"
            )
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer defines no BOS or EOS token; set bos_token/eos_token")
        backend_json = tokenizer.backend_tokenizer.to_str()
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        key = hashlib.sha256(f"{bos_id} {eos_id} {backend_json}".encode()).hexdigest()
        return cls(backend_json, bos_id, eos_id, key)


class PieceEncoder:
    """Encodes text pieces with the tokenizer's Rust backend, special-token matching off."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.bos_id = spec.bos_id
        self.eos_id = spec.eos_id
        self.backend = Tokenizer.from_str(spec.backend_json)
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


_ENCODERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, PieceEncoder] = (
    weakref.WeakKeyDictionary()
)
_SPEC_ENCODERS: dict[str, PieceEncoder] = {}


def _encoder(tokenizer: PreTrainedTokenizerBase) -> PieceEncoder:
    if tokenizer not in _ENCODERS:
        _ENCODERS[tokenizer] = PieceEncoder(EncoderSpec.of(tokenizer))
    return _ENCODERS[tokenizer]


def spec_encoder(spec: EncoderSpec) -> PieceEncoder:
    """The encoder of `spec`, built once per process (a Ray worker reuses it for every batch)."""
    if spec.key not in _SPEC_ENCODERS:
        if len(_SPEC_ENCODERS) >= 4:
            _SPEC_ENCODERS.clear()
        _SPEC_ENCODERS[spec.key] = PieceEncoder(spec)
    return _SPEC_ENCODERS[spec.key]


# Piece kinds as small integers, for the vectorized assembly.
_BOS, _TEXT, _IMAGE, _EOS = 0, 1, 2, 3
_KIND_CODES = {"bos": _BOS, "text": _TEXT, "image": _IMAGE, "eos": _EOS}


@dataclass
class EncodedBatch:
    """A batch of encoded samples, flat: row i's tokens are `input_ids[offsets[i]:offsets[i+1]]`.

    A dropped row has no tokens; `drops` holds its DropSample. The arrays go into Arrow as they are.
    """

    input_ids: np.ndarray  # (N,) int32, all rows back to back
    labels: np.ndarray  # (N,) int32, IGNORE_INDEX where no loss is taken
    offsets: np.ndarray  # (R + 1,) int32
    num_images: np.ndarray  # (R,) int32: images whose runs are kept, in order
    truncated: np.ndarray  # (R,) bool
    drops: dict[int, DropSample]  # row -> why it was dropped

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    def reasons(self) -> list[str]:
        """Per row: "" when kept, else the drop reason."""
        reasons = [""] * self.num_rows
        for row, drop in self.drops.items():
            reasons[row] = drop.reason
        return reasons

    def results(self) -> list[Encoded | DropSample]:
        out: list[Encoded | DropSample] = []
        ids, labels = self.input_ids.tolist(), self.labels.tolist()
        for row in range(self.num_rows):
            if row in self.drops:
                out.append(self.drops[row])
                continue
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            out.append(
                Encoded(
                    input_ids=ids[start:end],
                    labels=labels[start:end],
                    num_images=int(self.num_images[row]),
                    truncated=bool(self.truncated[row]),
                )
            )
        return out


def assemble(
    encoder: PieceEncoder,
    num_rows: int,
    piece_row: np.ndarray,
    piece_kind: np.ndarray,
    piece_supervised: np.ndarray,
    texts: list[str],
    drops: dict[int, DropSample],
    *,
    num_visual_tokens: int,
    max_length: int | None,
    require_supervised: bool = True,
) -> EncodedBatch:
    """Encode and label a batch given as flat piece arrays, without a Python loop over samples.

    Piece p belongs to row `piece_row[p]` (rows in order, a row's pieces in order) and has kind
    `piece_kind[p]` (`_BOS`, `_TEXT`, `_IMAGE`, `_EOS`); text pieces take `texts` in order, all
    encoded in one tokenizer call. Rows in `drops` have no pieces. A row is cut at `max_length`,
    or at the start of the image run the limit falls in (never part of an image); a row left
    with no supervised token is dropped as "no_supervised_tokens" when `require_supervised`.
    """
    drops = dict(drops)
    text_ids = encoder.encode(texts)
    text_lengths = np.fromiter(map(len, text_ids), np.int64, count=len(text_ids))
    flat_text = np.fromiter(
        itertools.chain.from_iterable(text_ids), np.int32, count=int(text_lengths.sum())
    )
    is_text, is_image = piece_kind == _TEXT, piece_kind == _IMAGE
    piece_length = np.ones(len(piece_kind), np.int64)
    piece_length[is_text] = text_lengths
    piece_length[is_image] = num_visual_tokens
    row_length = np.bincount(piece_row, weights=piece_length, minlength=num_rows).astype(np.int64)
    row_start = np.zeros(num_rows + 1, np.int64)
    np.cumsum(row_length, out=row_start[1:])
    piece_start = np.zeros(len(piece_kind), np.int64)  # within its row
    if len(piece_kind):
        global_start = np.cumsum(piece_length) - piece_length
        piece_start = global_start - row_start[piece_row]

    # Every position of every row: its token and its label.
    position_piece = np.repeat(np.arange(len(piece_kind)), piece_length)
    position_kind = piece_kind[position_piece]
    input_ids = np.empty(len(position_piece), np.int32)
    input_ids[position_kind == _TEXT] = flat_text
    input_ids[position_kind == _IMAGE] = IMAGE_TOKEN_ID
    input_ids[position_kind == _BOS] = encoder.bos_id
    input_ids[position_kind == _EOS] = encoder.eos_id
    labels = np.where(piece_supervised[position_piece], input_ids, np.int32(IGNORE_INDEX))

    # Where each row is cut: the limit, moved back to the start of an image run it falls in.
    cut = row_length.copy() if max_length is None else np.minimum(row_length, max_length)
    image_row, image_start = piece_row[is_image], piece_start[is_image]
    split = (image_start < cut[image_row]) & (cut[image_row] < image_start + num_visual_tokens)
    cut[image_row[split]] = image_start[split]  # runs do not overlap: one per row at most
    first_supervised = np.full(num_rows, np.iinfo(np.int64).max)
    has_tokens = piece_supervised & (piece_length > 0)
    np.minimum.at(first_supervised, piece_row[has_tokens], piece_start[has_tokens])
    keep = np.ones(num_rows, bool)
    keep[list(drops)] = False
    if require_supervised:
        for row in np.flatnonzero(keep & (first_supervised >= cut)).tolist():
            drops[row] = DropSample(
                "no_supervised_tokens", f"{row_length[row]} tokens, limit {max_length}"
            )
            keep[row] = False
    cut[~keep] = 0
    kept_image = image_start + num_visual_tokens <= cut[image_row]
    num_images = np.bincount(image_row[kept_image], minlength=num_rows).astype(np.int32)

    position_row = piece_row[position_piece]
    position_in_row = np.arange(len(position_piece)) - row_start[position_row]
    kept_position = position_in_row < cut[position_row]
    offsets = np.zeros(num_rows + 1, np.int32)
    np.cumsum(cut, out=offsets[1:])
    return EncodedBatch(
        input_ids=input_ids[kept_position],
        labels=labels[kept_position],
        offsets=offsets,
        num_images=num_images,
        truncated=keep & (cut < row_length),
        drops=drops,
    )


def encode_piece_lists(
    encoder: PieceEncoder,
    batch: Sequence[list[Piece] | DropSample],
    *,
    num_visual_tokens: int,
    max_length: int | None,
    require_supervised: bool = True,
) -> EncodedBatch:
    """Encode many piece lists with one tokenizer call; DropSample entries stay dropped."""
    rows, kinds, supervised, texts = [], [], [], []
    drops: dict[int, DropSample] = {}
    for row, pieces in enumerate(batch):
        if isinstance(pieces, DropSample):
            drops[row] = pieces
            continue
        for piece in pieces:
            rows.append(row)
            kinds.append(_KIND_CODES[piece.kind])
            supervised.append(piece.supervised)
            if piece.kind == "text":
                texts.append(piece.text)
    return assemble(
        encoder,
        len(batch),
        np.array(rows, np.int64),
        np.array(kinds, np.int8),
        np.array(supervised, bool),
        texts,
        drops,
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
        require_supervised=require_supervised,
    )


def encode_caption_texts(
    encoder: PieceEncoder,
    captions: Sequence[str | None],
    *,
    num_visual_tokens: int,
    max_length: int,
) -> EncodedBatch:
    """Stage-1 samples of a batch: the pieces of `caption_pieces` (BOS, image, caption, EOS; loss
    on the caption and EOS) laid out as arrays directly, as the stage-1 step encodes millions."""
    stripped = [(c or "").strip() for c in captions]
    kept = [row for row, caption in enumerate(stripped) if caption]
    drops = {row: DropSample("empty_caption") for row, c in enumerate(stripped) if not c}
    return assemble(
        encoder,
        len(stripped),
        np.repeat(np.array(kept, np.int64), 4),
        np.tile(np.array([_BOS, _IMAGE, _TEXT, _EOS], np.int8), len(kept)),
        np.tile(np.array([False, False, True, True]), len(kept)),
        [stripped[row] for row in kept],
        drops,
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
    )


def encode_pieces_batch(
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[list[Piece] | DropSample],
    *,
    num_visual_tokens: int,
    max_length: int | None,
) -> list[Encoded | DropSample]:
    """Encode many piece lists with one tokenizer call; DropSample entries pass through."""
    return encode_piece_lists(
        _encoder(tokenizer), batch, num_visual_tokens=num_visual_tokens, max_length=max_length
    ).results()


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


def conversation_batch_pieces(
    samples: Sequence[tuple[list[Turn], int | None]], variant: str, system: str | None
) -> list[list[Piece] | DropSample]:
    """Training pieces of each (turns, number of images or None), or why it cannot be used."""
    batch: list[list[Piece] | DropSample] = []
    for turns, num_images in samples:
        try:
            batch.append(_training_pieces(turns, variant, num_images, system))
        except DropSample as drop:
            batch.append(drop)
    return batch


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
    return encode_pieces_batch(
        tokenizer,
        conversation_batch_pieces(samples, variant, system),
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
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
    end: str = "",
) -> list[int]:
    """Token ids to generate from: the conversation so far (ending with a user turn) and the
    assistant prefix. Equal to the prefix of the training encoding of the same conversation.
    `end` is appended to the assistant prefix, in its piece: the authors' benchmark scripts end
    with "ASSISTANT: ", whose space a SentencePiece tokenizer turns into one more token ("▁").
    Raises DropSample (a ValueError) for a conversation that does not alternate."""
    pieces = conversation_pieces(turns, get_template(variant, system), for_prompt=True)
    if end:
        pieces[-1] = pieces[-1]._replace(text=pieces[-1].text + end)
    encoded = encode_piece_lists(
        _encoder(tokenizer),
        [pieces],
        num_visual_tokens=num_visual_tokens,
        max_length=None,
        require_supervised=False,
    )
    return encoded.input_ids.tolist()


def encode_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    *,
    num_visual_tokens: int,
    max_length: int,
) -> list[Encoded | DropSample]:
    """Batched `encode_caption`."""
    return encode_caption_texts(
        _encoder(tokenizer), captions, num_visual_tokens=num_visual_tokens, max_length=max_length
    ).results()


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
