"""Packing, collation, the resumable shard loader, and packed-vs-padded loss equality."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.data.loader import LoaderConfig, ShardLoader, shards_from_manifest
from owl.data.manifest import Manifest
from owl.data.packing import Sample, collate, pack_rows, pad_rows
from owl.data.schema import TOKENIZED_SCHEMA
from owl.model import OwlModel, get_config
from owl.train.loss import mean_token_loss, num_supervised, shifted_targets

NUM_VISUAL = get_config("debug-tiny").num_visual_tokens


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample(seed: int, *, length: int, images: int) -> dict:
    """Prompt (BOS, image slots, text) with no loss, then a supervised reply."""
    rng = np.random.default_rng(seed)
    prompt = [1] + [IMAGE_TOKEN_ID] * (NUM_VISUAL * images)
    prompt += rng.integers(3, 256, max(1, length // 2 - len(prompt))).tolist()
    reply = rng.integers(3, 256, max(2, length - len(prompt))).tolist()
    ids = prompt + reply
    labels = [IGNORE_INDEX] * len(prompt) + reply
    return {
        "sample_id": f"s{seed}",
        "kind": "multimodal" if images else "text",
        "input_ids": ids,
        "labels": labels,
        "images": [_png(seed * 10 + i) for i in range(images)],
        "num_tokens": len(ids),
        "num_supervised": len(reply),
        "source": f"test:{seed}",
    }


def write_shards(out: Path, samples: list[dict], per_shard: int) -> Manifest:
    manifest = Manifest(step="tokenize_test")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start : start + per_shard]
        table = pa.Table.from_pylist(chunk, schema=TOKENIZED_SCHEMA)
        rel = f"shards/shard-{n:05d}.arrow"
        with (
            pa.OSFile(str(out / rel), "wb") as sink,
            pa.ipc.new_file(sink, TOKENIZED_SCHEMA) as writer,
        ):
            writer.write_table(table)
        manifest.add_file(out, rel, rows=len(chunk), tokens=sum(s["num_tokens"] for s in chunk))
    return manifest


def mixed_samples(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        make_sample(i, length=int(rng.integers(8, 60)), images=int(rng.integers(0, 3)))
        for i in range(count)
    ]


@pytest.fixture()
def shard_dir(tmp_path: Path) -> tuple[Path, Manifest]:
    manifest = write_shards(tmp_path, mixed_samples(40), per_shard=15)
    return tmp_path, manifest


def _loader(shard_dir, **overrides) -> ShardLoader:
    directory, manifest = shard_dir
    rank = overrides.pop("rank", 0)
    world_size = overrides.pop("world_size", 1)
    cfg = LoaderConfig(**{"micro_batch_size": 2, "max_length": 64, "image_size": 32, **overrides})
    return ShardLoader(
        shards_from_manifest(manifest, directory), cfg, rank=rank, world_size=world_size
    )


def test_pack_rows_respects_length_and_image_caps() -> None:
    lengths, images = [30, 20, 50, 10, 40, 5], [1, 0, 2, 1, 0, 1]
    rows = pack_rows(range(6), lengths, images, max_length=64, max_images_per_row=2, window=4)
    assert sorted(i for row in rows for i in row) == list(range(6))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 64 and sum(images[i] for i in row) <= 2
    assert len(rows) < 6  # something was packed together
    assert pad_rows([3, 1]) == [[3], [1]]


def test_collate_builds_segments_and_restarting_positions() -> None:
    a = Sample([1, 5, 6], [IGNORE_INDEX, 5, 6], [b"img-a"])
    b = Sample([1, 7], [IGNORE_INDEX, 7], [])
    c = Sample([1, 8, 9, 10], [IGNORE_INDEX, IGNORE_INDEX, 9, 10], [b"img-c"])
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 8, 9, 10, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"][1, 4] == IGNORE_INDEX
    assert batch["image_bytes"] == [b"img-a", b"img-c"]
    # The last token of sample a must not predict the BOS of sample b.
    targets = shifted_targets(batch["labels"], batch["segment_ids"])
    assert targets.tolist() == [[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 9, 10, IGNORE_INDEX]]
    assert num_supervised(batch["labels"], batch["segment_ids"]) == 5


def test_ranks_get_disjoint_shares_and_equal_step_counts(shard_dir) -> None:
    loaders = [_loader(shard_dir, rank=r, world_size=2, packing=False) for r in range(2)]
    plans = [ld._micro_batches(0) for ld in loaders]
    assert len(plans[0]) == len(plans[1]) == 10  # 40 samples / (2 rows * 2 ranks)
    seen = [{i for batch in plan for row in batch for i in row} for plan in plans]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_shuffle_is_seeded_per_epoch(shard_dir) -> None:
    first, again = _loader(shard_dir), _loader(shard_dir)
    assert first._micro_batches(0) == again._micro_batches(0)
    assert first._micro_batches(0) != first._micro_batches(1)
    other_seed = _loader(shard_dir, seed=1)
    assert other_seed._micro_batches(0) != first._micro_batches(0)


def test_packing_fills_rows_and_mixes_modalities(shard_dir) -> None:
    loader = _loader(shard_dir, max_images_per_row=3)
    batch = next(loader)
    assert batch["segment_ids"].max() >= 2  # several samples per row
    assert batch["images"].shape[1:] == (3, 32, 32)
    slots = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert slots == batch["images"].shape[0] * NUM_VISUAL
    for row in batch["segment_ids"]:
        assert int((row > 0).sum()) <= 64


def test_resume_continues_with_the_exact_next_batch(shard_dir) -> None:
    loader = _loader(shard_dir)
    total = loader.batches_per_epoch(0)
    for _ in range(total - 1):  # stop one before the epoch boundary
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]  # crosses into epoch 1
    resumed = _loader(shard_dir)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"])
    assert resumed.epoch == 1
    with pytest.raises(ValueError, match="world_size"):
        _loader(shard_dir, world_size=2).load_state_dict(state)


def test_samples_that_cannot_fit_are_counted_not_silently_dropped(shard_dir) -> None:
    loader = _loader(shard_dir, max_length=30, max_images_per_row=1)
    assert loader.dropped["loader.too_long"] > 0
    assert loader.dropped["loader.too_many_images"] > 0
    assert loader.num_samples + sum(loader.dropped.values()) == 40


def test_empty_shard_set_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no tokenized shards"):
        ShardLoader([], LoaderConfig(micro_batch_size=1, max_length=8))


def test_digest_mismatch_names_the_shard(shard_dir) -> None:
    directory, manifest = shard_dir
    victim = directory / "shards" / "shard-00001.arrow"
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001\.arrow: sha256 does not match"):
        _loader(shard_dir)


def test_packed_and_padded_batches_give_the_same_loss() -> None:
    torch.manual_seed(0)
    model = OwlModel(get_config("debug-tiny")).eval()
    raw = [
        make_sample(i, length=n, images=k)
        for i, (n, k) in enumerate([(20, 1), (9, 0), (30, 2), (14, 0)])
    ]
    samples = [Sample(s["input_ids"], s["labels"], s["images"]) for s in raw]
    images = torch.randn(3, 3, 32, 32)  # (N, 3, S, S) in sample order
    packed = collate([[samples[0], samples[1]], [samples[2], samples[3]]], pad_id=0)
    padded = collate([[s] for s in samples], pad_id=0)
    losses = []
    for batch in (packed, padded):
        with torch.no_grad():
            logits = model(
                batch["input_ids"],
                images,
                position_ids=batch["position_ids"],
                segment_ids=batch["segment_ids"],
            )
        losses.append(mean_token_loss(logits, batch["labels"], batch["segment_ids"]))
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
