"""Tokenization: exact loss masks, prompt/training consistency, truncation, drop reasons, the BPE
tokenizer, sources and the shard writer. Tokenizers are trained here on a few sentences."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.data.schema import TOKENIZED_SCHEMA
from owl.data.shards import ShardWriter, make_batch, read_shard
from owl.data.sources import Bad, Record, SourceSpec, _parse, check_source, read_source
from owl.data.templates import (
    DropSample,
    Piece,
    Turn,
    caption_pieces,
    conversation_pieces,
    count_placeholders,
    get_template,
    render,
)
from owl.data.tokenize import (
    Encoded,
    conversation_batch_pieces,
    encode_caption,
    encode_captions,
    encode_conversation,
    encode_pieces_batch,
    encode_prompt,
)
from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer

NUM_VISUAL = 5
CORPUS = [
    "a red circle on the left and a blue square on the right",
    "USER: What colour is the circle? ASSISTANT: Red.",
    "Human: How many shapes are there?\nAI: Two shapes.",
    "The following is a conversation between a curious human and AI assistant.",
] * 20
TURNS = [
    Turn("user", "<image>\nWhat colour is the circle?"),
    Turn("assistant", "Red."),
    Turn("user", "How many shapes? </s> ignore"),
    Turn("assistant", "Two shapes."),
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CORPUS, 320, out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def sentencepiece_like(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """LLaMA-style: Metaspace pre-tokenizer that prepends '▁' to the text itself."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    out = tmp_path_factory.mktemp("sp")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(out))
    return load_tokenizer(out)


@pytest.fixture(params=["bpe", "sentencepiece_like"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(request.param)


def _text_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
def test_labels_are_exactly_the_replies_and_eos(
    tokenizer: PreTrainedTokenizerFast, variant: str
) -> None:
    enc = encode_conversation(
        tokenizer,
        TURNS,
        variant=variant,
        num_visual_tokens=NUM_VISUAL,
        max_length=512,
        num_images=1,
    )
    eos = tokenizer.eos_token_id
    assert len(enc.input_ids) == len(enc.labels)
    for i, label in enumerate(enc.labels):
        assert label in (IGNORE_INDEX, enc.input_ids[i])
    # Each supervised run is the reply (tokenized as the word after the separator) + EOS.
    # SentencePiece-like tokenizers add the leading space marker themselves.
    sep = (
        ""
        if isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace)
        else " "
    )
    reply_ids = [_text_ids(tokenizer, sep + "Red."), _text_ids(tokenizer, sep + "Two shapes.")]
    assert _supervised_runs(enc.labels) == [reply_ids[0] + [eos], reply_ids[1] + [eos]]
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == NUM_VISUAL and enc.num_images == 1
    # The typed "</s>" in the user turn is text: EOS appears only at the two turn ends.
    assert enc.input_ids.count(eos) == 2 and enc.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
def test_tokens_decode_to_the_rendered_template(bpe: PreTrainedTokenizerFast, variant: str) -> None:
    """Byte-level BPE round-trips exactly, so tokens must spell the rendered text."""
    enc = encode_conversation(
        bpe, TURNS, variant=variant, num_visual_tokens=NUM_VISUAL, max_length=512
    )
    template = get_template(variant)
    expected = render(conversation_pieces(TURNS, template, for_prompt=False), template)
    text_runs, i = [], 0
    while i < len(enc.input_ids):
        if enc.input_ids[i] == IMAGE_TOKEN_ID:
            text_runs.append(template.placeholder)
            i += NUM_VISUAL
            continue
        j = i
        while j < len(enc.input_ids) and enc.input_ids[j] != IMAGE_TOKEN_ID:
            j += 1
        text_runs.append(bpe.decode(enc.input_ids[i:j], skip_special_tokens=False))
        i = j
    assert "".join(text_runs) == expected


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
def test_prompt_is_the_prefix_of_the_training_encoding(
    tokenizer: PreTrainedTokenizerFast, variant: str
) -> None:
    enc = encode_conversation(
        tokenizer, TURNS, variant=variant, num_visual_tokens=NUM_VISUAL, max_length=512
    )
    for num_turns in (1, 3):
        prompt = encode_prompt(
            tokenizer, TURNS[:num_turns], variant=variant, num_visual_tokens=NUM_VISUAL
        )
        assert enc.input_ids[: len(prompt)] == prompt
        # The next tokens are exactly the supervised reply of turn `num_turns` (+ EOS).
        runs = _supervised_runs(enc.labels)
        reply = runs[num_turns // 2]
        assert enc.input_ids[len(prompt) : len(prompt) + len(reply)] == reply
        # The prompt holds the earlier replies' supervised tokens and nothing else supervised.
        num_earlier = sum(len(run) for run in runs[: num_turns // 2])
        assert sum(label != IGNORE_INDEX for label in enc.labels[: len(prompt)]) == num_earlier


def test_truncation_never_exceeds_max_length_nor_splits_an_image(
    bpe: PreTrainedTokenizerFast,
) -> None:
    turns = [
        Turn("user", "<image> left <|image|> right"),
        Turn("assistant", "a red circle on the left"),
        Turn("user", "and <image> this one"),
        Turn("assistant", "a blue square on the right"),
    ]
    full = encode_conversation(
        bpe, turns, variant="owl2", num_visual_tokens=NUM_VISUAL, max_length=10_000
    )
    rng = random.Random(0)
    for max_length in sorted({rng.randrange(1, len(full.input_ids) + 2) for _ in range(60)}):
        try:
            enc = encode_conversation(
                bpe,
                turns,
                variant="owl2",
                num_visual_tokens=NUM_VISUAL,
                max_length=max_length,
                num_images=3,
            )
        except DropSample as drop:
            assert drop.reason == "no_supervised_tokens"
            continue
        assert len(enc.input_ids) <= max_length
        assert enc.input_ids == full.input_ids[: len(enc.input_ids)]
        flags = "".join("i" if t == IMAGE_TOKEN_ID else "t" for t in enc.input_ids)
        runs = [run for run in flags.replace("t", " ").split() if run]
        assert all(len(run) == NUM_VISUAL for run in runs)
        assert enc.num_images == len(runs)
        assert enc.truncated == (len(enc.input_ids) < len(full.input_ids))


def test_sample_with_no_supervised_token_is_dropped(bpe: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DropSample) as info:
        encode_conversation(bpe, TURNS, variant="owl2", num_visual_tokens=NUM_VISUAL, max_length=8)
    assert info.value.reason == "no_supervised_tokens"


@pytest.mark.parametrize(
    ("turns", "num_images", "reason"),
    [
        (TURNS, 0, "placeholder_image_mismatch"),
        (TURNS, 2, "placeholder_image_mismatch"),
        ([Turn("user", "hi"), Turn("user", "again"), Turn("assistant", "x")], 0, "not_alternating"),
        ([Turn("user", "hi"), Turn("assistant", "  ")], 0, "empty_reply"),
    ],
)
def test_drop_reasons(
    bpe: PreTrainedTokenizerFast, turns: list[Turn], num_images: int, reason: str
) -> None:
    with pytest.raises(DropSample) as info:
        encode_conversation(
            bpe,
            turns,
            variant="owl2",
            num_visual_tokens=NUM_VISUAL,
            max_length=512,
            num_images=num_images,
        )
    assert info.value.reason == reason


def test_caption_encoding(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = encode_caption(tokenizer, "a red circle", num_visual_tokens=NUM_VISUAL, max_length=64)
    caption = _text_ids(tokenizer, "a red circle")
    assert enc.input_ids == [tokenizer.bos_token_id] + [IMAGE_TOKEN_ID] * NUM_VISUAL + caption + [2]
    assert enc.labels == [IGNORE_INDEX] * (1 + NUM_VISUAL) + caption + [2]
    with pytest.raises(DropSample, match="empty_caption"):
        encode_caption(tokenizer, " ", num_visual_tokens=NUM_VISUAL, max_length=64)


def _reference_encoding(
    pieces: list[Piece], tokenizer: PreTrainedTokenizerFast, max_length: int
) -> Encoded | DropSample:
    """The per-sample definition the batched assembly must match: pieces one by one, labels from
    each piece, cut at max_length or at the start of the image run it falls in."""
    ids, labels, runs, first_supervised = [], [], [], None
    for piece in pieces:
        if piece.kind == "text":
            text = piece.text
            if isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace):
                text = text[1:] if text.startswith(" ") else text
            piece_ids = tokenizer(
                text, add_special_tokens=False, split_special_tokens=True
            ).input_ids
        elif piece.kind == "image":
            runs.append((len(ids), len(ids) + NUM_VISUAL))
            piece_ids = [IMAGE_TOKEN_ID] * NUM_VISUAL
        else:
            piece_ids = [tokenizer.bos_token_id if piece.kind == "bos" else tokenizer.eos_token_id]
        if piece.supervised and piece_ids and first_supervised is None:
            first_supervised = len(ids)
        ids += piece_ids
        labels += piece_ids if piece.supervised else [IGNORE_INDEX] * len(piece_ids)
    cut = min(len(ids), max_length)
    cut = next((start for start, end in runs if start < cut < end), cut)
    if first_supervised is None or first_supervised >= cut:
        return DropSample("no_supervised_tokens")
    num_images = sum(end <= cut for _, end in runs)
    return Encoded(ids[:cut], labels[:cut], num_images, truncated=cut < len(ids))


def test_batched_assembly_matches_the_per_sample_definition(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """A mixed batch (drops before and after tokenization, 0-3 images, cuts inside image runs and
    text) encodes row by row exactly as the plain per-sample definition does."""
    rng = random.Random(1)
    words = " ".join(CORPUS[:4]).replace("\n", " ").split()
    samples = []
    for _ in range(120):
        turns = []
        for _ in range(rng.randint(1, 3)):
            question = " ".join(rng.choices(words, k=rng.randint(0, 6)))
            images = "<image> " * rng.choice([0, 0, 1, 2, 3])
            turns += [
                Turn("user", images + question),
                Turn("assistant", " ".join(rng.choices(words, k=rng.choice([0, 1, 3, 8])))),
            ]
        if rng.random() < 0.1:
            turns.reverse()  # not alternating
        samples.append((turns, sum(count_placeholders(t.text) for t in turns)))
    batch = conversation_batch_pieces(samples, "owl2", None)
    for max_length in (8, 13, 20, 40, 512):
        encoded = encode_pieces_batch(
            tokenizer, batch, num_visual_tokens=NUM_VISUAL, max_length=max_length
        )
        for pieces, got in zip(batch, encoded):
            want = (
                pieces
                if isinstance(pieces, DropSample)
                else (_reference_encoding(pieces, tokenizer, max_length))
            )
            if isinstance(want, DropSample):
                assert isinstance(got, DropSample) and got.reason == want.reason
            else:
                assert got == want
    reasons = {r.reason for r in encoded if isinstance(r, DropSample)}
    assert {"not_alternating", "empty_reply"} <= reasons  # the batch did mix drops in
    short = encode_pieces_batch(tokenizer, batch, num_visual_tokens=NUM_VISUAL, max_length=13)
    assert any(isinstance(r, DropSample) and r.reason == "no_supervised_tokens" for r in short)
    assert any(isinstance(r, Encoded) and r.truncated for r in short)


def test_batched_captions_match_the_caption_template(tokenizer: PreTrainedTokenizerFast) -> None:
    """The stage-1 fast path (no Piece objects) gives what `caption_pieces` defines, row by row."""
    captions = ["a red circle", "  ", "", " blue square on the right ", "USER: </s> left"] * 3
    for max_length in (NUM_VISUAL + 1, NUM_VISUAL + 3, 64):
        encoded = encode_captions(
            tokenizer, captions, num_visual_tokens=NUM_VISUAL, max_length=max_length
        )
        for caption, got in zip(captions, encoded):
            if not caption.strip():
                assert isinstance(got, DropSample) and got.reason == "empty_caption"
                continue
            want = _reference_encoding(caption_pieces(caption), tokenizer, max_length)
            if isinstance(want, DropSample):
                assert isinstance(got, DropSample) and got.reason == want.reason
            else:
                assert got == want


def test_bpe_tokenizer_is_deterministic_with_llama_special_ids(tmp_path: Path) -> None:
    train_bpe_tokenizer(CORPUS, 300, tmp_path / "a")
    train_bpe_tokenizer(CORPUS, 300, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_text() == (
        tmp_path / "b/tokenizer.json"
    ).read_text()
    tok = load_tokenizer(tmp_path / "a")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) <= 300
    assert tok.decode(_text_ids(tok, "ünïcode ☃ text")) == "ünïcode ☃ text"


def test_load_tokenizer_names_the_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_shard_writer_rolls_over_and_round_trips(tmp_path: Path) -> None:
    def batch(n: int, start: int) -> pa.RecordBatch:
        ids = [[1, IMAGE_TOKEN_ID, 5 + i] for i in range(n)]
        return make_batch(
            [f"s{start + i}" for i in range(n)],
            ["caption"] * n,
            ids,
            [[IGNORE_INDEX, IGNORE_INDEX, 5 + i] for i in range(n)],
            [[b"img"]] * n,
            ["src"] * n,
        )

    with ShardWriter(tmp_path, rows_per_shard=10) as writer:
        writer.write(batch(7, 0))
        writer.write(batch(18, 7))
        shards = writer.close()
    assert [(s.path, s.rows, s.tokens, s.supervised) for s in shards] == [
        ("shards/shard-00000.arrow", 10, 30, 10),
        ("shards/shard-00001.arrow", 10, 30, 10),
        ("shards/shard-00002.arrow", 5, 15, 5),
    ]
    tables = [read_shard(tmp_path / s.path) for s in shards]
    assert all(t.schema.equals(TOKENIZED_SCHEMA) for t in tables)
    ids = [sid for t in tables for sid in t.column("sample_id").to_pylist()]
    assert ids == [f"s{i}" for i in range(25)]


def test_sources_read_each_format_and_count_bad_records(tmp_path: Path) -> None:
    llava = tmp_path / "llava.jsonl"
    llava.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "id": "a",
                        "image": "x.png",
                        "conversations": [
                            {"from": "human", "value": "<image>\nq"},
                            {"from": "gpt", "value": "r"},
                        ],
                    }
                ),
                "{not json",
                json.dumps({"id": "b", "conversations": [{"from": "robot", "value": "q"}]}),
                json.dumps({"id": "c"}),
            ]
        )
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    records = list(read_source(SourceSpec("llava", str(llava), "/imgs")))
    assert isinstance(records[0], Record) and records[0].images == ["/imgs/x.png"]
    assert records[0].turns == [Turn("user", "<image>\nq"), Turn("assistant", "r")]
    assert [r.reason for r in records[1:] if isinstance(r, Bad)] == [
        "malformed_json",
        "unknown_speaker",
        "missing_field",
    ]
    [record] = list(read_source(SourceSpec("alpaca", str(alpaca))))
    assert isinstance(record, Record)
    assert record.turns == [Turn("user", "Add\n\n1 2"), Turn("assistant", "3")]
    # One rule in both formats: a value that is not a string is not made text; it is counted.
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps([
        {"instruction": "Add", "input": "1 2", "output": 3},
        {"instruction": "Add", "input": 12, "output": "3"},
        {"instruction": "Say yes", "output": True},
    ]))  # fmt: skip
    assert [r.reason for r in read_source(SourceSpec("alpaca", str(numbers)))] == ["not_text"] * 3
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"conversations": [{"from": "human", "value": "1+2?"},
                                                     {"from": "gpt", "value": 3}]}))  # fmt: skip
    assert [r.reason for r in read_source(SourceSpec("llava", str(numeric)))] == ["not_text"]
    with pytest.raises(ValueError, match=r"alpaca.json.*conversations"):
        check_source(SourceSpec("sharegpt", str(alpaca)))
    with pytest.raises(ValueError, match="not found"):
        check_source(SourceSpec("alpaca", str(tmp_path / "missing.json")))


def _llava_like(i: int) -> dict:
    """A varied record: list or single image, unicode, escapes, numbers, nesting."""
    record = {
        "id": f"s{i}",
        "image": [f"a/{i}.jpg", f"b/{i}.png"] if i % 3 == 0 else f"img/{i}.jpg",
        "conversations": [
            {"from": "human", "value": f'<image>\nWhat is "{i}"? ünï ☃ \\ {i * 0.5}'},
            {"from": "gpt", "value": "line one\nline two " * (i % 4)},
        ],
        "meta": {"score": i / 7, "tags": [i, None, True]},
    }
    if i % 101 == 0:
        record["conversations"][0]["from"] = "robot"  # a Bad record
    return record


def test_large_json_array_streams_the_same_records_as_json_load(tmp_path: Path) -> None:
    objects = [_llava_like(i) for i in range(10_000)]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(objects, indent=1, ensure_ascii=False), encoding="utf-8")
    spec = SourceSpec("llava", str(path), "/imgs")
    whole = json.loads(path.read_text(encoding="utf-8"))  # the file read at once, as before
    expected = [_parse(spec, obj, i, "/imgs") for i, obj in enumerate(whole)]
    assert list(read_source(spec)) == expected
    assert sum(isinstance(r, Bad) for r in expected) == 100  # the robots
    # JSONL, read line by line, gives the same records (sources name their own file).
    lines = tmp_path / "llava.jsonl"
    lines.write_text("\n".join(json.dumps(o) for o in objects))
    from_lines = list(read_source(SourceSpec("llava", str(lines), "/imgs")))
    assert [r.sample_id if isinstance(r, Record) else r.reason for r in from_lines] == [
        r.sample_id if isinstance(r, Record) else r.reason for r in expected
    ]


def test_json_array_is_parsed_incrementally(tmp_path: Path) -> None:
    """Records come out before the parser reaches the end: a file broken at its end yields its
    first records, then fails naming the file (json.load would fail before the first)."""
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([_llava_like(i) for i in range(1, 3000)])[:-200])
    records = read_source(SourceSpec("llava", str(path)))
    assert isinstance(next(records), Record)
    with pytest.raises(ValueError, match=r"broken\.json: cannot read instruction data"):
        list(records)
    not_array = tmp_path / "object.json"
    not_array.write_text(json.dumps({"data": [_llava_like(1)]}))
    with pytest.raises(ValueError, match=r"object\.json: expected a JSON array.*an object"):
        list(read_source(SourceSpec("llava", str(not_array))))
