"""The tokenizer, tokenize_captions and tokenize_instructions steps on a tiny local Ray (2 CPUs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from owl import IMAGE_TOKEN_ID
from owl.data.manifest import Manifest
from owl.data.schema import TOKENIZED_SCHEMA
from owl.data.shards import index_path, read_index, read_shard
from owl.data.sources import SourceSpec
from owl.model.config import AbstractorConfig, DecoderConfig, OwlConfig
from pipelines.step import Resources, StepContext, StepInput
from pipelines.steps import _tokenized, tokenize_captions, tokenize_instructions, tokenizer
from tests.integration import bad_images

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("local_ray")]

MODEL = OwlConfig(
    name="test",
    variant="owl2",
    abstractor=AbstractorConfig(num_queries=3),
    decoder=DecoderConfig(max_positions=64),
)  # 4 visual tokens per image


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _ctx(tmp_path: Path, step: str) -> StepContext:
    out = tmp_path / step
    out.mkdir()
    return StepContext(
        step=step, out_dir=out, job_name="test", model=MODEL, resources=Resources(num_workers=2)
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake filter output (2 parquet shards) and instruction files with bad records."""
    root = tmp_path_factory.mktemp("tok")
    data = root / "filter"
    (data / "shards").mkdir(parents=True)
    manifest = Manifest(step="filter")
    captions = [f"a red circle number {i}" for i in range(30)] + ["   "]
    for shard, rows in enumerate([captions[:16], captions[16:]]):
        table = pa.table(
            {
                "key": [f"k{shard}-{i}" for i in range(len(rows))],
                "url": [f"file:///img/{shard}/{i}.png" for i in range(len(rows))],
                "caption": rows,
                "image": [_png("red")] * len(rows),
            }
        )
        pq.write_table(table, data / f"shards/{shard:05d}.parquet", row_group_size=4)
        manifest.add_file(data, f"shards/{shard:05d}.parquet", rows=len(rows))
    manifest.write(data)

    shapes = root / "shapes"
    (shapes / "images").mkdir(parents=True)
    (shapes / "images/a.png").write_bytes(_png("blue"))
    (shapes / "images/grey16.png").write_bytes(bad_images.grey16_png(0x8000, size=8))
    good = {
        "id": "good",
        "image": "images/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "Blue."},
        ],
    }
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "grey16", "image": "images/grey16.png"}),
        json.dumps({**good, "id": "json", "image": "instructions.jsonl"}),  # the file itself
        json.dumps({**good, "id": "etc", "image": "/etc/hostname"}),
        json.dumps({**good, "id": "up", "image": "../filter/manifest.json"}),
        "{broken",
        json.dumps({**good, "id": "missing", "image": "images/none.png"}),
        json.dumps({**good, "id": "noimage", "image": None}),
        json.dumps(
            {
                "id": "order",
                "conversations": [
                    {"from": "gpt", "value": "hi"},
                    {"from": "human", "value": "hello"},
                ],
            }
        ),
    ]
    (shapes / "instructions.jsonl").write_text("\n".join(lines))
    (shapes / "text.json").write_text(
        json.dumps([{"instruction": "Repeat: cat", "input": "", "output": "cat"}] * 3)
    )
    (shapes / "nulls.json").write_text(
        json.dumps(
            [
                {"instruction": "Say dog", "input": None, "output": "dog"},  # null input: none
                {"instruction": "Say dog", "input": "", "output": None},
                {"instruction": None, "input": "", "output": "dog"},
                {"instruction": "Say\u0000dog", "input": "", "output": "dog"},
            ]
        )
    )
    return root


def _input(path: Path, name: str) -> StepInput:
    return StepInput(name=name, dir=path, manifest=Manifest.read(path))


@pytest.fixture(scope="module")
def tokenizer_input(workdir: Path) -> StepInput:
    out = workdir / "tokenizer"
    out.mkdir()
    ctx = StepContext(step="tokenizer", out_dir=out, job_name="test", model=MODEL)
    cfg = tokenizer.Config(vocab_size=300, texts=[SourceSpec("alpaca", "@shapes/text.json")])
    inputs = {
        "data": _input(workdir / "filter", "filter"),
        "shapes": StepInput("shapes", workdir / "shapes", Manifest("shapes")),
    }
    manifest = tokenizer.run(ctx, cfg, inputs)
    assert manifest.stats["num_texts"] == 31 + 6  # 31 captions + 3 x 2 Alpaca turns
    manifest.write(out)
    return _input(out, "tokenizer")


def _check_shards(out_dir: Path, manifest: Manifest) -> list[dict]:
    manifest.write(out_dir)
    assert Manifest.read(out_dir).verify(out_dir, full=True) == []
    rows = []
    entries = {e.path: e for e in manifest.files}
    shards = [e for e in manifest.files if e.path.endswith(".arrow")]
    assert len(entries) == 2 * len(shards)  # each shard and its index
    for entry in shards:
        table = read_shard(out_dir / entry.path)
        assert table.schema.equals(TOKENIZED_SCHEMA)
        assert entry.rows == table.num_rows
        assert entry.tokens == sum(len(ids) for ids in table.column("input_ids").to_pylist())
        # The per-shard index the streaming loader plans from: tokens, images, supervised.
        index = read_index(out_dir / entries[index_path(entry.path)].path, entry.rows)
        assert index.tolist() == [
            [len(ids) for ids in table.column("input_ids").to_pylist()],
            [len(images) for images in table.column("images").to_pylist()],
            [sum(x >= 0 for x in labels) for labels in table.column("labels").to_pylist()],
        ]
        rows.extend(table.to_pylist())
    return rows


def test_tokenize_captions(workdir: Path, tokenizer_input: StepInput, tmp_path: Path) -> None:
    inputs = {"data": _input(workdir / "filter", "filter"), "tokenizer": tokenizer_input}
    # Tasks of 8 rows (two row groups of 4) across the 2 files, 5 captions per tokenizer call.
    cfg = tokenize_captions.Config(rows_per_shard=12, batch_size=5, rows_per_task=8)
    files = [workdir / f"filter/shards/{i:05d}.parquet" for i in range(2)]
    assert [c["row_groups"] for c in _tokenized.parquet_chunks(files, 8)] == [
        [0, 1],
        [2, 3],
        [0, 1],
        [2, 3],
    ]
    manifest = tokenize_captions.run(_ctx(tmp_path, "tokenize_captions"), cfg, inputs)
    rows = _check_shards(tmp_path / "tokenize_captions", manifest)
    assert [len(rows)] == [30] and [
        f.rows for f in manifest.files if f.path.endswith(".arrow")
    ] == [12, 12, 6]
    # Input order is kept across tasks (deterministic shards), the blank caption is counted.
    assert [r["sample_id"] for r in rows] == [f"k0-{i}" for i in range(16)] + [
        f"k1-{i}" for i in range(14)
    ]
    assert manifest.dropped == {"tokenize_captions.empty_caption": 1}
    assert manifest.stats["samples_in"] == 31 and manifest.stats["samples_out"] == 30
    # Counted once: MLflow's and `owl audit`'s rows, the model card's rows and shards (each
    # shard's index is listed beside it, without rows of its own).
    from pipelines.lineage import _file_counts
    from pipelines.steps.export import _data_section

    counts = _file_counts(manifest)
    assert (counts["rows"], counts["shards"], counts["files"]) == (30, 3, 6)
    section = _data_section({"captions": StepInput("tokenize_captions", tmp_path, manifest)})
    assert section.splitlines()[2].startswith("| captions | tokenize_captions | 30 | ")
    assert section.splitlines()[2].split(" | ")[4] == "3"  # shards
    for row in rows:
        assert row["input_ids"][1:5] == [IMAGE_TOKEN_ID] * 4 and row["images"] == [_png("red")]
        assert len(row["input_ids"]) <= 64 and row["source"].startswith("file:///img/")
    # Same inputs -> byte-identical shards.
    again = tokenize_captions.run(_ctx(tmp_path, "again"), cfg, inputs)
    assert again.digest == manifest.digest


def test_tokenize_instructions_counts_bad_records(
    workdir: Path, tokenizer_input: StepInput, tmp_path: Path
) -> None:
    shapes = StepInput("shapes", workdir / "shapes", Manifest("shapes"))
    cfg = tokenize_instructions.Config(
        sources=[
            SourceSpec("llava", "@shapes/instructions.jsonl"),
            SourceSpec("alpaca", "@shapes/text.json"),
            SourceSpec("alpaca", "@shapes/nulls.json"),
        ],
        batch_size=2,
        rows_per_task=3,  # the 9 records that reach encoding go to 3 tasks; order is kept
    )
    inputs = {"tokenizer": tokenizer_input, "shapes": shapes}
    manifest = tokenize_instructions.run(_ctx(tmp_path, "tokenize_instructions"), cfg, inputs)
    rows = _check_shards(tmp_path / "tokenize_instructions", manifest)
    assert manifest.dropped == {
        "tokenize_instructions.image_outside_root": 2,
        "tokenize_instructions.malformed_json": 1,
        "tokenize_instructions.missing_field": 2,
        "tokenize_instructions.missing_image": 1,
        "tokenize_instructions.not_alternating": 1,
        "tokenize_instructions.not_an_image": 1,
        "tokenize_instructions.nul_character": 1,
        "tokenize_instructions.placeholder_image_mismatch": 1,
    }
    assert [(r["sample_id"], r["kind"], len(r["images"])) for r in rows] == [
        ("good", "multimodal", 1),
        ("grey16", "multimodal", 1),
        *[(f"{workdir}/shapes/text.json:{i}", "text", 0) for i in range(3)],
        (f"{workdir}/shapes/nulls.json:0", "text", 0),
    ]
    assert rows[0]["images"] == [_png("blue")]  # a plain image is stored as it came
    grey = Image.open(io.BytesIO(rows[1]["images"][0]))  # a 16-bit one normalised, not white
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (128, 128, 128)
    assert manifest.stats["samples_in"] == 16 and manifest.stats["supervised_tokens"] > 0
    assert not (tmp_path / "tokenize_instructions" / "_work").exists()  # records' work files


def test_structural_errors_stop_before_work(
    workdir: Path, tokenizer_input: StepInput, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    (bad / "shards").mkdir(parents=True)
    pq.write_table(
        pa.table({"key": ["a"], "url": ["u"], "image": [b"x"]}), bad / "shards/0.parquet"
    )
    manifest = Manifest(step="filter")
    manifest.add_file(bad, "shards/0.parquet")
    ctx = _ctx(tmp_path, "tokenize_captions")
    inputs = {"data": StepInput("filter", bad, manifest), "tokenizer": tokenizer_input}
    with pytest.raises(ValueError, match=r"0\.parquet.*'caption'"):
        tokenize_captions.run(ctx, tokenize_captions.Config(), inputs)
    assert not any(ctx.out_dir.iterdir())
    cfg = tokenize_instructions.Config(
        sources=[SourceSpec("sharegpt", str(workdir / "shapes/text.json"))]
    )
    with pytest.raises(ValueError, match=r"text\.json.*conversations"):
        tokenize_instructions.run(ctx, cfg, {"tokenizer": tokenizer_input})
