"""The stage's sample stream dealt per optimizer step (owl.data.step_stream): every step trains on
the same samples whatever the number of workers, W == num_workers gives each worker exactly its
former per-rank loader, and a stream saved by W workers resumes on W' workers."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_streaming_loader import CFG, _write

from owl.data.loader import ShardLoader
from owl.data.step_stream import StepStream
from owl.data.streaming import StreamingLoader

NUM_STREAMS, ACCUM = 2, 3


def _streams(shards: list, kind: type, world_size: int) -> list[StepStream]:
    def make(rank: int, num_streams: int):
        loader = kind(shards, CFG, rank=rank, world_size=num_streams)
        loader.collate_rows = lambda rows: rows  # the sample references, not tensors
        return loader

    return [
        StepStream(make, num_streams=NUM_STREAMS, grad_accum=ACCUM, rank=r, world_size=world_size)
        for r in range(world_size)
    ]


def _steps(workers: list[StepStream], count: int) -> list[list]:
    """Per optimizer step: the sample references of all workers' micro-batches, in order."""
    steps = []
    for _ in range(count):
        micro = [batch for worker in workers for batch in worker.next_step()]
        steps.append([ref for rows in micro for row in rows for ref in row])
    return steps


@pytest.fixture()
def shards(tmp_path: Path) -> list:
    return _write(tmp_path, "a", count=95, per_shard=10)


@pytest.mark.parametrize("kind", [StreamingLoader, ShardLoader])
def test_every_step_trains_on_the_same_samples_whatever_the_workers(shards, kind) -> None:
    reference = _steps(_streams(shards, kind, NUM_STREAMS), 12)  # past an epoch end
    for world_size in (1, 3, 4, 6):
        assert _steps(_streams(shards, kind, world_size), 12) == reference, world_size
    # W == num_workers: worker w's micro-batches are its former per-rank loader's, as before.
    for rank in range(NUM_STREAMS):
        alone = kind(shards, CFG, rank=rank, world_size=NUM_STREAMS)
        worker = _streams(shards, kind, NUM_STREAMS)[rank]
        for _ in range(4):
            expected = [alone._next_rows() for _ in range(ACCUM)]
            assert worker.next_step() == expected


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4), (4, 3)])
def test_a_stream_saved_by_w_workers_resumes_on_w_prime(shards, before, after) -> None:
    reference = _steps(_streams(shards, StreamingLoader, 1), 10)
    first = _streams(shards, StreamingLoader, before)
    assert _steps(first, 4) == reference[:4]
    saved = [worker.state_dict() for worker in first]
    resumed = _streams(shards, StreamingLoader, after)
    for worker in resumed:
        worker.load_state_dict(saved)
    assert _steps(resumed, 6) == reference[4:]


def test_shorter_slices_are_padded_and_too_many_workers_refused(shards) -> None:
    workers = _streams(shards, StreamingLoader, 4)  # 6 micro-batches per step on 4 workers
    assert [len(w.mine) for w in workers] == [1, 2, 1, 2]
    assert [w.padding for w in workers] == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="at most 6 workers"):
        _streams(shards, StreamingLoader, 7)


def test_state_of_another_stream_definition_is_refused(shards) -> None:
    saved = [w.state_dict() for w in _streams(shards, StreamingLoader, 1)]
    other = StepStream(
        lambda rank, n: StreamingLoader(shards, CFG, rank=rank, world_size=n),
        num_streams=NUM_STREAMS,
        grad_accum=ACCUM + 1,
    )
    with pytest.raises(ValueError, match="grad_accum=3, this stage has 4"):
        other.load_state_dict(saved)


def test_a_checkpoint_of_per_worker_loaders_still_resumes(shards) -> None:
    """Loader states saved before streams were named (one per worker, in rank order) resume,
    on any number of workers; an incomplete set is refused with what to do."""
    reference = _steps(_streams(shards, StreamingLoader, NUM_STREAMS), 6)
    first = _streams(shards, StreamingLoader, NUM_STREAMS)
    _steps(first, 2)
    old = [next(iter(w.loaders.values())).state_dict() for w in first]
    for world_size in (NUM_STREAMS, 1):
        resumed = _streams(shards, StreamingLoader, world_size)
        for worker in resumed:
            worker.load_state_dict(old)
        assert _steps(resumed, 4) == reference[2:]
    with pytest.raises(ValueError, match="resume it with num_workers=1"):
        _streams(shards, StreamingLoader, 1)[0].load_state_dict(old[:1])


def test_samples_drawn_are_the_streams_whatever_the_workers(tmp_path, shards) -> None:
    """Each stream counts every micro-batch of it, the ones its worker skips (another worker
    trains them) included: per stream, the counts of any number of workers are the same."""
    from owl.data.streaming import Dataset

    mix = [Dataset(shards, 3.0, "data"), Dataset(_write(tmp_path, "b", 40, 10, seed=7), 1.0, "b")]

    def drawn(world_size: int) -> dict[int, list[int]]:
        workers = _streams(mix, StreamingLoader, world_size)
        _steps(workers, 9)
        return {v: s["drawn"] for w in workers for v, s in w.state_dict()["streams"].items()}

    reference = drawn(NUM_STREAMS)
    assert all(min(counts) > 0 for counts in reference.values())
    for world_size in (1, 4):
        assert drawn(world_size) == reference, world_size
