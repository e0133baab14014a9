"""The streaming loader: shards dealt to ranks, exact resume, mixing, lazy digests, index files."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_packing import make_sample, mixed_samples, write_shards

from owl.data.loader import LoaderConfig, shards_from_manifest
from owl.data.manifest import Manifest
from owl.data.schema import TOKENIZED_SCHEMA
from owl.data.shards import ShardWriter, read_index
from owl.data.streaming import Dataset, StreamingLoader

CFG = LoaderConfig(micro_batch_size=2, max_length=64, image_size=16, shuffle_buffer=10)


def _write(out: Path, name: str, count: int, per_shard: int, seed: int = 0) -> list:
    """Tokenized shards as the tokenize step writes them (with their index files)."""
    rng = np.random.default_rng(seed)
    samples = [
        make_sample(
            seed * 1000 + i, length=int(rng.integers(8, 40)), images=int(rng.integers(0, 2))
        )
        for i in range(count)
    ]
    for s in samples:
        s["source"] = name
    manifest = Manifest(step="tokenize_test")
    with ShardWriter(out / name, per_shard) as writer:
        writer.write(pa.Table.from_pylist(samples, schema=TOKENIZED_SCHEMA))
        shards = writer.close()
    for shard in shards:
        manifest.add_file(out / name, shard.path, rows=shard.rows, tokens=shard.tokens)
        manifest.add_file(out / name, shard.index, rows=shard.rows)
    return shards_from_manifest(manifest, out / name)


@pytest.fixture()
def shards(tmp_path: Path) -> list:
    return _write(tmp_path, "a", count=95, per_shard=10)  # 10 shards, the last one of 5


def _ids(batch: dict) -> list[int]:
    return batch["input_ids"].flatten().tolist()


def _epoch(loader: StreamingLoader, collate: bool = False) -> list[list]:
    """One epoch of this rank's rows (as (dataset, shard, row) refs), batch by batch."""
    batches = [loader._next_rows() for _ in range(loader.batches_per_epoch())]
    if collate:
        for rows in batches:
            loader.collate_rows(rows)  # reads the samples: opens (and checks) their shards
    return batches


def test_index_files_hold_tokens_images_and_supervised(shards) -> None:
    ref = shards[3]
    table = pa.ipc.open_file(ref.path).read_all()
    index = read_index(ref.index, ref.rows)
    assert index[0].tolist() == table.column("num_tokens").to_pylist()
    assert index[1].tolist() == [len(x) for x in table.column("images").to_pylist()]
    assert index[2].tolist() == table.column("num_supervised").to_pylist()


def test_ranks_get_disjoint_shares_equal_batches_and_open_only_their_shards(shards) -> None:
    loaders = [StreamingLoader(shards, CFG, rank=r, world_size=3) for r in range(3)]
    counts = {ld.batches_per_epoch() for ld in loaders}
    assert len(counts) == 1 and counts.pop() > 0  # the same number on every rank
    seen = []
    for ld in loaders:
        refs = [ref for batch in _epoch(ld, collate=True) for row in batch for ref in row]
        share = ld._share(0, 0)
        # Its row range covers whole shards plus at most a part of one at each end (95 rows /
        # 3 ranks: 3 to 5 of the 10 shards): it reads those shards only.
        overlap = share.perm[(share.starts < share.stop) & (share.ends > share.start)]
        opened = {shard for _, shard in ld._tables}
        assert opened <= {int(s) for s in overlap} and 2 <= len(opened) <= 5
        if ld.dropped["loader.epoch_fill_rows"] == 0:
            assert max(Counter(refs).values()) == 1  # no sample twice in an epoch
        seen.append(Counter(refs))
    # No sample on two ranks; within an epoch a sample is used at most once (fill rows aside).
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(seen[a]) & set(seen[b])
    fill = sum(ld.dropped["loader.epoch_fill_rows"] for ld in loaders)
    tail = sum(ld.dropped["loader.epoch_tail_rows"] for ld in loaders)
    assert tail + fill <= 6  # the per-epoch count fits the ranks' real row counts closely


def test_epochs_reshuffle_and_deal_shards_anew(shards) -> None:
    a, b = StreamingLoader(shards, CFG), StreamingLoader(shards, CFG)
    first = _epoch(a)
    assert first == _epoch(b)  # deterministic
    assert first != _epoch(a)  # epoch 1 differs
    other = StreamingLoader(shards, LoaderConfig(**{**CFG.__dict__, "seed": 5}))
    assert _epoch(other) != first
    shares = [StreamingLoader(shards, CFG, rank=0, world_size=2)._share(0, e) for e in range(2)]
    assert shares[0].perm.tolist() != shares[1].perm.tolist()


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_the_exact_next_batches_across_buffers_and_epochs(shards, world_size):
    for stop_at in (3, None):  # mid-epoch, and one batch before the epoch boundary
        loader = StreamingLoader(shards, CFG, rank=world_size - 1, world_size=world_size)
        per_epoch = loader.batches_per_epoch()
        for _ in range(stop_at or per_epoch - 1):
            next(loader)
        state = loader.state_dict()
        assert set(state) >= {"epoch", "buffer", "row", "done"}
        assert all(isinstance(v, int) for k, v in state.items() if k not in ("dropped", "drawn"))
        expected = [next(loader) for _ in range(per_epoch + 2)]  # into epoch 1 (and 2)
        resumed = StreamingLoader(shards, CFG, rank=world_size - 1, world_size=world_size)
        resumed.load_state_dict(state)
        for want in expected:
            got = next(resumed)
            assert torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["labels"], want["labels"])
        assert resumed.epoch == loader.epoch >= 1
    with pytest.raises(ValueError, match="world_size"):
        other = StreamingLoader(shards, CFG, rank=world_size - 1, world_size=world_size + 1)
        other.load_state_dict(state)


def test_a_corrupted_shard_is_named_when_first_opened_and_never_used(shards) -> None:
    loader = StreamingLoader(shards, CFG)  # start-up reads no shard digest
    victim = Path(shards[4].path)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    used = []
    with pytest.raises(ValueError, match=r"shard-00004\.arrow: sha256 does not match"):
        for _ in range(4 * loader.batches_per_epoch()):
            used.append(loader._next_rows())
            loader.collate_rows(used[-1])
    assert used  # some batches came before it ...
    # ... and none of the rows handed out before the error came from the corrupted shard
    assert all(shard != 4 for batch in used[:-1] for row in batch for _, shard, _ in row)
    index = Path(shards[2].index)
    index.write_bytes(index.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ValueError, match=r"shard-00002\.index\.npy: sha256 does not match"):
        loader = StreamingLoader(shards, CFG)
        for _ in range(4 * loader.batches_per_epoch()):
            loader._next_rows()


def test_mixing_follows_the_weights_deterministically_and_resumes(tmp_path, shards) -> None:
    text = _write(tmp_path, "b", count=40, per_shard=10, seed=7)
    mix = [Dataset(shards, weight=3.0), Dataset(text, weight=1.0)]
    cfg = LoaderConfig(**{**CFG.__dict__, "shuffle_buffer": 20})
    loader = StreamingLoader(mix, cfg, rank=1, world_size=2)
    refs = [ref for _ in range(3) for batch in _epoch(loader) for row in batch for ref in row]
    by_dataset = Counter(d for d, _, _ in refs)
    assert 2.5 < by_dataset[0] / by_dataset[1] < 3.5  # buffers of 15 + 5 samples
    again = StreamingLoader(mix, cfg, rank=1, world_size=2)
    assert [ref for _ in range(3) for b in _epoch(again) for r in b for ref in r] == refs
    # The smaller dataset cycles through its own epochs: each of its samples comes up in turn.
    stream_b = [
        (s, r)
        for e in range(2)
        for b in range(again.buffers_per_epoch)
        for d, s, r in again._buffer_samples(e, b)
        if d == 1
    ]
    for start in range(0, len(stream_b) - 19, 20):  # its share on rank 1: 20 samples
        assert len(set(stream_b[start : start + 20])) == 20
    # Exact resume with a mix.
    loader = StreamingLoader(mix, cfg, rank=1, world_size=2)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    want = [next(loader) for _ in range(6)]
    resumed = StreamingLoader(mix, cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(_ids(next(resumed)) == _ids(w) for w in want)
    with pytest.raises(ValueError, match="weights must be > 0"):
        StreamingLoader([Dataset(shards, 0.0)], cfg)


def test_drops_are_counted_and_shards_without_index_work(tmp_path) -> None:
    manifest = write_shards(tmp_path, mixed_samples(40), per_shard=15)  # no index files
    refs = shards_from_manifest(manifest, tmp_path)
    assert all(ref.index == "" for ref in refs)
    cfg = LoaderConfig(**{**CFG.__dict__, "max_length": 30, "max_images_per_row": 1})
    cfg = LoaderConfig(**{**cfg.__dict__, "shuffle_buffer": 100})
    loader = StreamingLoader(refs, cfg)
    _epoch(loader)
    assert loader.dropped["loader.too_long"] > 0
    assert loader.dropped["loader.too_many_images"] > 0
    with pytest.raises(ValueError, match="no tokenized shards"):
        StreamingLoader([], CFG)


def test_a_stage_mixes_datasets_named_in_its_config(tmp_path, shards) -> None:
    from owl.model import get_config
    from owl.train.config import TrainConfig
    from owl.train.data_plan import plan_data
    from pipelines.step import StepInput
    from pipelines.steps.train import mixed_shards

    other = tmp_path / "other"
    text = _write(tmp_path, "other", count=30, per_shard=10, seed=3)
    manifest = Manifest(step="tokenize_test")
    for ref in text:
        manifest.add_file(other, Path(ref.path).relative_to(other).as_posix(), rows=ref.rows)
        manifest.add_file(other, Path(ref.index).relative_to(other).as_posix(), rows=ref.rows)
    manifest.write(other)
    inputs = {"extra": StepInput("extra", other, manifest)}
    cfg = TrainConfig().replace(
        data={"loader": "streaming", "mix": {"@extra": 1.0}, "data_weight": 4.0}
    )
    plan = plan_data(cfg, get_config("debug-tiny"), shards, mixed_shards(cfg, inputs))
    assert [(len(d.shards), d.weight) for d in plan.datasets] == [(10, 4.0), (3, 1.0)]
    assert plan.dataset_names() == ["data", "@extra"]
    # The plan's datasets, read with this file's loader settings (a smaller shuffle buffer).
    plan = dataclasses.replace(plan, loader_cfg=dataclasses.replace(CFG, shuffle_buffer=20))
    loader = plan.driver_loader()
    refs = [ref for batch in _epoch(loader) for row in batch for ref in row]
    assert 3 < Counter(d for d, _, _ in refs)[0] / Counter(d for d, _, _ in refs)[1] < 5
    assert plan_data(TrainConfig(), get_config("debug-tiny"), shards).datasets == []
    with pytest.raises(ValueError, match="mix needs loader: streaming"):
        TrainConfig().replace(data={"loader": "global", "mix": {"@extra": 1.0}})
    with pytest.raises(ValueError, match=r"train.data.mix: /nowhere: no manifest.json"):
        mixed_shards(
            TrainConfig().replace(data={"loader": "streaming", "mix": {"/nowhere": 1.0}}), inputs
        )


def test_drop_counts_survive_a_resume_without_double_counting(tmp_path) -> None:
    manifest = write_shards(tmp_path, mixed_samples(40), per_shard=15)
    refs = shards_from_manifest(manifest, tmp_path)
    cfg = LoaderConfig(**{**CFG.__dict__, "max_length": 40, "shuffle_buffer": 12})
    straight = StreamingLoader(refs, cfg)
    for _ in range(7):
        next(straight)
    mid_buffer = 0
    for stop in range(1, 7):
        resumed = StreamingLoader(refs, cfg)
        for _ in range(stop):
            next(resumed)
        mid_buffer += resumed.state_dict()["row"] > 0
        again = StreamingLoader(refs, cfg)
        again.load_state_dict(resumed.state_dict())
        for _ in range(7 - stop):
            next(again)
        assert again.dropped == straight.dropped and straight.dropped["loader.too_long"] > 0
    assert mid_buffer  # some stops fell inside a buffer


def _unalike(tmp_path: Path) -> list:
    """Two shards that pack unalike: 40 long samples (one per 64-token row) and 40 short ones
    (about five per row), as the demo's stage 2 keeps every text-only sample in its last shard."""
    samples = [make_sample(i, length=40 + i % 20, images=0) for i in range(40)]
    samples += [make_sample(100 + i, length=8 + i % 5, images=0) for i in range(40)]
    manifest = Manifest(step="tokenize_test")
    with ShardWriter(tmp_path / "u", 40) as writer:
        writer.write(pa.Table.from_pylist(samples, schema=TOKENIZED_SCHEMA))
        for shard in writer.close():
            manifest.add_file(tmp_path / "u", shard.path, rows=shard.rows, tokens=shard.tokens)
            manifest.add_file(tmp_path / "u", shard.index, rows=shard.rows)
    return shards_from_manifest(manifest, tmp_path / "u")


def test_dealing_blocks_balances_unalike_shards_and_resumes(tmp_path) -> None:
    shards = _unalike(tmp_path)
    cfg = LoaderConfig(micro_batch_size=2, max_length=64, image_size=16, shuffle_buffer=100)

    def skipped_and_reread(block: int) -> int:
        block_cfg = LoaderConfig(**{**cfg.__dict__, "deal_block_rows": block})
        loaders = [StreamingLoader(shards, block_cfg, rank=r, world_size=2) for r in range(2)]
        for ld in loaders:
            for _ in range(4 * ld.batches_per_epoch()):  # 4 epochs
                ld._next_rows()
        return sum(ld.dropped[f"loader.epoch_{k}_rows"] for ld in loaders for k in ("tail", "fill"))

    # Whole shards: a rank holds one kind or the other, so the ranks' row counts differ by ~30
    # a epoch; blocks of 4 rows give each rank a mix of both shards.
    whole, blocks = skipped_and_reread(0), skipped_and_reread(4)
    assert whole >= 80 and blocks <= whole / 4, (whole, blocks)

    block_cfg = LoaderConfig(**{**cfg.__dict__, "deal_block_rows": 4})
    for epoch in range(2):  # every row on exactly one rank per epoch, from both shards
        refs = []
        for rank in range(2):
            share = StreamingLoader(shards, block_cfg, rank=rank, world_size=2)._share(0, epoch)
            located = share.locate(np.arange(share.size))
            refs.append(set(zip(*(a.tolist() for a in located))))
            assert {shard for shard, _ in refs[-1]} == {0, 1}
        assert not refs[0] & refs[1]
        assert refs[0] | refs[1] == {(s, r) for s in range(2) for r in range(40)}
    loader = StreamingLoader(shards, block_cfg, rank=1, world_size=2)
    for _ in range(loader.batches_per_epoch() - 1):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]  # across the epoch boundary
    resumed = StreamingLoader(shards, block_cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(resumed)["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="deal_block_rows must be >= 0"):
        StreamingLoader(shards, LoaderConfig(**{**cfg.__dict__, "deal_block_rows": -1}))


def test_samples_drawn_per_dataset_are_counted_exactly_and_resume(tmp_path, shards) -> None:
    """`drawn` counts each dataset's samples in the micro-batches the stream gave; a loader
    resumed from a state mid-buffer ends with the uninterrupted run's counts; the last buffer of
    an epoch, short of the first dataset, takes proportionally fewer of the others."""
    text = _write(tmp_path, "b", count=40, per_shard=10, seed=7)
    mix = [Dataset(shards, weight=3.0), Dataset(text, weight=1.0)]
    cfg = LoaderConfig(**{**CFG.__dict__, "shuffle_buffer": 20})
    steps = 25  # past an epoch end

    def run(loader: StreamingLoader, count: int) -> Counter:
        return Counter(d for _ in range(count) for row in loader._next_rows() for d, _, _ in row)

    loader = StreamingLoader(mix, cfg, rank=1, world_size=2)
    seen = run(loader, steps)
    assert loader.drawn == [seen[0], seen[1]] and min(loader.drawn) > 0
    first = StreamingLoader(mix, cfg, rank=1, world_size=2)
    run(first, 7)
    resumed = StreamingLoader(mix, cfg, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    run(resumed, steps - 7)
    assert resumed.drawn == loader.drawn
    # Epoch 0 of rank 1: its 48 samples of the first dataset in buffers of 15 (15, 15, 15, 3);
    # the second gives 5 a buffer and round(5 * 3 / 15) = 1 to the last: 16 (it gave 20 before).
    epoch = Counter(
        d for b in range(loader.buffers_per_epoch) for d, _, _ in loader._buffer_samples(0, b)
    )
    assert (loader.buffers_per_epoch, epoch[0], epoch[1]) == (4, 48, 16)
