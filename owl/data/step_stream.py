"""The sample stream of a training stage, defined independently of the number of workers.

A stage configured with `num_workers` = V and `grad_accum` = A reads V loader *streams*: the
per-rank loaders a V-worker run has (`ShardLoader` / `StreamingLoader` with rank v of V).
Optimizer step s trains on the G = V * A micro-batches s*A .. s*A + A - 1 of every stream,
listed in (stream, index) order. With W workers, worker w trains on the slice
[w*G//W, (w+1)*G//W) of that list:
  - W == V: worker w gets stream w whole, exactly what its per-rank loader gave before;
  - W < V (e.g. 1): a worker reads several streams;
  - otherwise a stream may be split between workers: each walks the stream's micro-batches that
    are not its own without reading them (`skip`: the plan only, no images decoded).
So every optimizer step trains on the same samples whatever W is (W <= G). Slices differ in
length by at most one; `padding` says how many zero-weight micro-batches a worker with the
shorter slice runs so that every rank runs the same number (DeepSpeed's collectives).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from owl.data.loader import ShardLoader
from owl.data.streaming import StreamingLoader

Loader = ShardLoader | StreamingLoader


class StepStream:
    """Worker `rank` of `world_size`: its micro-batches of every optimizer step (see module)."""

    def __init__(
        self,
        make_loader: Callable[[int, int], Loader],
        *,
        num_streams: int,
        grad_accum: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        total = num_streams * grad_accum
        if world_size > total:
            raise ValueError(
                f"{world_size} workers but one optimizer step has only {total} micro-batches "
                f"(num_workers={num_streams} x grad_accum={grad_accum}); use at most {total} workers"
            )
        assert 0 <= rank < world_size
        self.num_streams, self.grad_accum = num_streams, grad_accum
        self.rank, self.world_size = rank, world_size
        self.mine = range(rank * total // world_size, (rank + 1) * total // world_size)
        self.per_worker = -(-total // world_size)  # micro-batches every rank runs per step
        streams = sorted({i // grad_accum for i in self.mine})
        # make_loader(rank, world_size): the loader of stream v is rank v of num_streams.
        self.loaders: dict[int, Loader] = {v: make_loader(v, num_streams) for v in streams}

    @property
    def padding(self) -> int:
        """Zero-weight micro-batches this worker adds to each step (0 when W divides G)."""
        return self.per_worker - len(self.mine)

    def next_step(self) -> list[dict[str, Any]]:
        """This worker's collated micro-batches of the next optimizer step, in stream order."""
        batches = []
        for v, loader in self.loaders.items():
            for a in range(self.grad_accum):
                if v * self.grad_accum + a in self.mine:
                    batches.append(next(loader))
                else:
                    loader.skip()
        return batches

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Micro-batches per stream in `epoch` (every stream has as many)."""
        return next(iter(self.loaders.values())).batches_per_epoch(epoch)

    @property
    def dropped(self) -> Counter:
        total: Counter = Counter()
        for loader in self.loaders.values():
            total.update(getattr(loader, "dropped", {}))
        return total

    def state_dict(self) -> dict[str, Any]:
        """Each of this worker's streams' loader state, by stream: all at the same step."""
        return {
            "num_streams": self.num_streams,
            "grad_accum": self.grad_accum,
            "streams": {v: loader.state_dict() for v, loader in self.loaders.items()},
        }

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore from the states every worker saved (any number of workers): each stream's
        loader state is in the file of a worker that read it."""
        streams: dict[int, dict] = {}
        if states and all("streams" not in state for state in states):
            # Saved before streams were named: one loader per worker, in rank order.
            if len(states) != self.num_streams:
                raise ValueError(
                    f"the checkpoint was saved by {len(states)} workers before owl could resume "
                    f"on another number: resume it with num_workers={len(states)}"
                )
            states = [
                {"num_streams": self.num_streams, "grad_accum": self.grad_accum, "streams": {v: s}}
                for v, s in enumerate(states)
            ]
        for state in states:
            for key in ("num_streams", "grad_accum"):
                if state[key] != getattr(self, key):
                    raise ValueError(
                        f"loader state was saved with {key}={state[key]}, this stage has "
                        f"{getattr(self, key)}; num_workers and grad_accum define the sample "
                        "stream: keep them and set the workers the cluster offers through "
                        "fewer_workers: continue"
                    )
            streams.update(state["streams"])
        for v, loader in self.loaders.items():
            loader.load_state_dict(streams[v])
