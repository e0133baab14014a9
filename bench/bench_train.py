"""Training benchmarks, each a ratio against a baseline measured in the same run (CPU, one thread).

1. packing vs padding: supervised tokens/s of a bare train step over the *same* samples (one
   epoch of a fixed set), packed rows vs one sample per row padded to the longest sample of its
   micro-batch. In each repeat the two passes run interleaved step by step; each mode keeps its
   median over repeats (target >= 1.5x). `--dense-mask` adds both modes with attention under
   the dense block-diagonal mask (the model's attention before `SegmentLayout`), interleaved.
2. framework overhead: inside one Ray Train worker (gloo, 1 CPU), our stage loop
   (`owl.train.loop.run_training`: DeepSpeed engine, loader, metrics, `ray.train.report` every
   `log_every` steps) and a bare PyTorch loop (loader + forward + backward + clip + AdamW +
   schedule; the same initial weights, batches and optimizer settings) alternate window by
   window: after each window of `log_every` steps of ours, the bare loop runs the same
   `log_every` batches. Ratio of the median window step times after `--warmup` steps
   (target <= 1.15x).
3. loader throughput (collate + image preprocessing, one process) vs the samples/s the training
   consumes (target >= 10x).

    .venv/bin/python bench/bench_train.py --model demo [--dense-mask] [--only packing|overhead]

Times are given by the wall clock and by this process's CPU time: on a machine shared with other
jobs the second counts only the time this process ran.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.data.loader import ShardLoader, ShardRef, shards_from_manifest
from owl.data.manifest import Manifest
from owl.data.schema import TOKENIZED_SCHEMA
from owl.model import OwlConfig, OwlModel, get_config, load_model, save_model
from owl.train.config import TrainConfig, lr_multiplier, warmup_steps
from owl.train.data_plan import plan_data
from owl.train.loss import num_supervised, token_loss_sum
from owl.train.stages import param_groups, select_for_stage


def _length(rng: np.random.Generator, max_length: int) -> int:
    """Instruction-set-like lengths: log-normal (median max_length / 6, sigma 1), so most samples
    are short (one-line VQA answers) and a long tail (conversations, detailed descriptions)
    reaches max_length; draws past it are drawn again (the loader would drop them)."""
    while True:
        length = int(rng.lognormal(np.log(max_length / 6), 1.0))
        if 16 <= length <= max_length:
            return length


def _sample(i: int, rng: np.random.Generator, model: OwlConfig, max_length: int) -> dict:
    """Half with an image; the prompt (image slots + a third of the text) takes no loss."""
    num_images = int(rng.random() < 0.5)
    length = max(_length(rng, max_length), model.num_visual_tokens * num_images + 8)
    prompt = [1] + [IMAGE_TOKEN_ID] * (model.num_visual_tokens * num_images)
    prompt += rng.integers(3, model.decoder.vocab_size, max(2, length // 3)).tolist()
    reply = rng.integers(3, model.decoder.vocab_size, max(4, length - len(prompt))).tolist()
    ids = (prompt + reply)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + reply)[:max_length]
    images = []
    for _ in range(num_images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    return {
        "sample_id": f"b{i}", "kind": "multimodal" if images else "text", "input_ids": ids,
        "labels": labels, "images": images, "num_tokens": len(ids),
        "num_supervised": sum(x != IGNORE_INDEX for x in labels), "source": "bench",
    }  # fmt: skip


def write_data(directory: Path, model: OwlConfig, count: int, max_length: int) -> Manifest:
    rng = np.random.default_rng(0)
    rows = [_sample(i, rng, model, max_length) for i in range(count)]
    (directory / "shards").mkdir(parents=True)
    rel = "shards/shard-00000.arrow"
    with (
        pa.OSFile(str(directory / rel), "wb") as sink,
        pa.ipc.new_file(sink, TOKENIZED_SCHEMA) as w,
    ):
        w.write_table(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA))
    manifest = Manifest(step="bench")
    manifest.add_file(directory, rel, rows=count, tokens=sum(r["num_tokens"] for r in rows))
    return manifest


def make_loader(shards: list[ShardRef], model: OwlConfig, cfg: TrainConfig) -> ShardLoader:
    """The global loader (one rank) with the stage's loader settings (owl.train.data_plan)."""
    return ShardLoader(shards, plan_data(cfg, model, shards).loader_cfg)


def _rewind(loader: ShardLoader) -> None:
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "offset": 0})


class BareLoop:
    """A plain PyTorch loop: the same loader, model, trainable set, AdamW groups, clipping and
    learning-rate schedule as a stage, without DeepSpeed, Ray or metrics."""

    def __init__(
        self, model: OwlModel, loader: ShardLoader, cfg: TrainConfig, total_steps: int
    ) -> None:
        self.model = model.train()
        select_for_stage(self.model, model.cfg.variant, cfg)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg),
            lr=cfg.optimizer.lr,
            betas=cfg.optimizer.betas,
            eps=cfg.optimizer.eps,
        )
        warmup = warmup_steps(cfg, total_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_multiplier(
                s, warmup=warmup, total=total_steps, min_ratio=cfg.schedule.min_lr_ratio
            ),
        )
        self.loader, self.cfg = loader, cfg

    def step(self) -> tuple[int, int]:
        """One optimizer step on the next micro-batch: (supervised tokens, samples)."""
        batch = next(self.loader)
        logits = self.model(
            batch["input_ids"], batch["images"], position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"],
        )  # fmt: skip
        count = num_supervised(batch["labels"], batch["segment_ids"])
        loss = token_loss_sum(logits, batch["labels"], batch["segment_ids"]) / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return count, batch["num_samples"]

    def run(self, steps: int) -> tuple[list[tuple[float, float]], int]:
        """(wall, CPU) seconds of each of `steps` optimizer steps, and the supervised tokens."""
        times, supervised = [], 0
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            supervised += self.step()[0]
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        return times, supervised


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- 1. packing vs padding ------------------------------------------------------------------

CLOCKS = ("wall", "cpu")


def _median_pair(values: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


@contextlib.contextmanager
def _attention(kind: str) -> Iterator[None]:
    """`segments`: the model as it is (per-segment attention, `SegmentLayout`). `dense-mask`: for
    comparison, SDPA under the dense (B, 1, T, T) block-diagonal mask the model used before."""
    import owl.model.model as model_module

    layout = model_module.SegmentLayout
    if kind == "dense-mask":
        model_module.SegmentLayout = lambda s: model_module.segment_mask(s, s)
    try:
        yield
    finally:
        model_module.SegmentLayout = layout


def _describe(name: str, loader: ShardLoader, num_batches: int) -> None:
    batches = [next(loader) for _ in range(num_batches)]
    _rewind(loader)
    samples = sum(b["num_samples"] for b in batches)
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    positions = sum(b["input_ids"].numel() for b in batches)
    supervised = sum(num_supervised(b["labels"], b["segment_ids"]) for b in batches)
    print(
        f"[packing] {name}: {num_batches} micro-batches of {loader.cfg.micro_batch_size} rows, "
        f"{samples} samples, {supervised} supervised tokens, {tokens} tokens in "
        f"{positions} positions ({tokens / positions:.0%} real)"
    )


def bench_packing(
    model_cfg: OwlConfig,
    shards: list[ShardRef],
    base: TrainConfig,
    repeats: int,
    attentions: tuple[str, ...] = ("segments",),
) -> None:
    modes = [(attention, packing) for attention in attentions for packing in (False, True)]
    loops, epoch = {}, {}
    for attention, packing in modes:
        cfg = base.replace(batch={"packing": packing})
        torch.manual_seed(cfg.seed)
        loop = BareLoop(OwlModel(model_cfg), make_loader(shards, model_cfg, cfg), cfg, 1)
        loops[attention, packing], epoch[attention, packing] = (
            loop,
            loop.loader.batches_per_epoch(0),
        )
        if attention == attentions[0]:
            _describe("packed" if packing else "padded", loop.loader, epoch[attention, packing])
        with _attention(attention):
            loop.run(2)  # warm-up (first-step allocations)
    rates: dict[tuple[str, bool], list[tuple[float, float]]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        # One pass over the samples in each mode, all interleaved step by step (the mode least
        # far through its pass goes next), so every mode sees the same load on a shared machine.
        done = dict.fromkeys(modes, 0)
        spent = {mode: [0.0, 0.0] for mode in modes}
        supervised = dict.fromkeys(modes, 0)
        for loop in loops.values():
            _rewind(loop.loader)
        while min(done[m] / epoch[m] for m in modes) < 1:
            mode = min(modes, key=lambda m: done[m] / epoch[m])
            with _attention(mode[0]):
                (times,), count = loops[mode].run(1)
            done[mode] += 1
            supervised[mode] += count
            spent[mode] = [spent[mode][i] + times[i] for i in (0, 1)]
        for mode in modes:
            rates[mode].append(tuple(supervised[mode] / t for t in spent[mode]))
        for attention in attentions:
            padded, packed = rates[attention, False][-1], rates[attention, True][-1]
            print(
                f"[packing] repeat {repeat + 1}, attention {attention}: supervised tok/s "
                f"wall-clock padded {padded[0]:,.0f} packed {packed[0]:,.0f}; CPU-time padded "
                f"{padded[1]:,.0f} packed {packed[1]:,.0f} (load {_load_avg()})"
            )
    for attention in attentions:
        padded, packed = _median_pair(rates[attention, False]), _median_pair(rates[attention, True])
        for i, clock in enumerate(CLOCKS):
            print(
                f"[packing] attention {attention}, {clock}: median padded {padded[i]:,.0f}, "
                f"packed {packed[i]:,.0f} supervised tok/s, ratio packed/padded = "
                f"{packed[i] / padded[i]:.2f}x (target >= 1.5x)"
            )


# --- 2. Ray Train + DeepSpeed vs a bare loop, in one worker ---------------------------------


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _overhead_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: our stage loop, with a bare loop run in between its windows."""
    import contextlib

    from owl.train.loop import run_training
    from pipelines.steps._ray_train import RaySession

    job, every = config["job"], config["job"].train.log_every
    cfg: TrainConfig = job.train

    class InterleavedSession(RaySession):
        """The step's Ray session (metrics and checkpoints go through ray.train.report). The
        stage loop calls `report` once per `log_every` steps; each call closes a window of our
        loop (its steps, metrics and the report itself), then runs the bare loop over the
        same `log_every` batches, timed apart. Both loops thus alternate every few seconds
        and see the same load. The run starts from step 0 (no restore)."""

        def __init__(self, bare: BareLoop) -> None:
            super().__init__("")
            self.bare, self.mark = bare, _clock()
            self.windows: list[tuple[int, tuple[float, float], tuple[float, float]]] = []

        def restore_dir(self) -> contextlib.AbstractContextManager[Path | None]:
            return contextlib.nullcontext(None)

        def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
            super().report(metrics, checkpoint_dir)
            ours = tuple((now - then) / every for now, then in zip(_clock(), self.mark))
            step = int(metrics["step"])
            if step < cfg.schedule.max_steps:  # the last window also saves and exports: not timed
                times, _ = self.bare.run(every)
                bare = tuple(sum(t[c] for t in times) / every for c in (0, 1))
                self.windows.append((step, ours, bare))
            self.mark = _clock()

    torch.manual_seed(cfg.seed)
    bare = BareLoop(
        load_model(job.init_model_dir),
        make_loader(job.data.shards, job.model, cfg),
        cfg,
        cfg.schedule.max_steps,
    )
    session = InterleavedSession(bare)
    state = run_training(job, session)
    windows = [(ours, bare) for step, ours, bare in session.windows if step > config["warmup"]]
    out = {"threads": torch.get_num_threads(), "windows": windows}
    out["samples_per_step"] = state.samples / state.step
    Path(config["out"]).write_text(json.dumps(out))


def bench_overhead(
    model_cfg: OwlConfig, shards: list[ShardRef], base: TrainConfig, *, warmup: int, steps: int
) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from owl.train.job import WorkerJob

    every = base.log_every
    warmup, steps = -(-warmup // every) * every, -(-steps // every) * every  # whole windows
    cfg = base.replace(
        schedule={"max_steps": warmup + steps + every},
        checkpoint={"every": 10**6},
        resources={"num_workers": 1, "cpus_per_worker": 1},
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(cfg.seed)
            save_model(OwlModel(model_cfg), Path(tmp) / "init")
            data = dataclasses.replace(plan_data(cfg, model_cfg, shards), verify_in_workers=False)
            job = WorkerJob(
                train=cfg, model=model_cfg, data=data, init_model_dir=str(Path(tmp) / "init")
            )
            config = {"job": job, "warmup": warmup, "out": str(Path(tmp) / "timings.json")}
            TorchTrainer(
                _overhead_worker,
                train_loop_config=config,
                torch_config=TorchConfig(backend="gloo"),
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="bench", storage_path=str(Path(tmp) / "ray")),
            ).fit()
            out = json.loads(Path(config["out"]).read_text())
    finally:
        ray.shutdown()
    windows = out["windows"]
    print(
        f"[overhead] ZeRO-{cfg.memory.zero_stage}, {out['threads']} torch thread(s) in the worker, "
        f"{warmup} warm-up steps, then {len(windows)} windows of {every} steps of each loop, "
        "alternating"
    )
    for i, clock in enumerate(CLOCKS):
        ours = statistics.median(w[0][i] for w in windows)
        bare = statistics.median(w[1][i] for w in windows)
        paired = [w[0][i] / w[1][i] for w in windows]
        print(
            f"[overhead] {clock}: median ms/step bare {bare * 1e3:.1f}, Ray Train + DeepSpeed "
            f"{ours * 1e3:.1f}: ratio ray/bare = {ours / bare:.3f}x (target <= 1.15x); "
            f"per-window ratios median {statistics.median(paired):.3f}, "
            f"quartiles {np.percentile(paired, 25):.3f}-{np.percentile(paired, 75):.3f}"
        )
    rate = out["samples_per_step"] / statistics.median(w[0][0] for w in windows)
    print(f"[overhead] training consumes {rate:,.1f} samples/s (load {_load_avg()})")
    return rate


# --- 3. loader throughput --------------------------------------------------------------------


def bench_loader(
    model_cfg: OwlConfig, shards: list[ShardRef], cfg: TrainConfig, consumed: float
) -> None:
    loader = make_loader(shards, model_cfg, cfg)
    next(loader)
    started, samples = time.perf_counter(), 0
    while time.perf_counter() - started < 5.0:
        samples += next(loader)["num_samples"]
    rate = samples / (time.perf_counter() - started)
    print(f"[loader] {rate:,.0f} samples/s (collate + image preprocessing, 1 process)")
    print(f"[loader] ratio loader/training = {rate / consumed:.1f}x (target >= 10x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="packing: repeats of each mode")
    parser.add_argument("--packing-samples", type=int, default=160, help="samples per repeat")
    parser.add_argument("--samples", type=int, default=2000, help="data for the overhead bench")
    parser.add_argument("--warmup", type=int, default=10, help="overhead: untimed first steps")
    parser.add_argument("--steps", type=int, default=100, help="overhead: timed steps of each loop")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=TrainConfig().memory.zero_stage)
    parser.add_argument("--only", choices=("packing", "overhead"), default=None)
    parser.add_argument(
        "--dense-mask",
        action="store_true",
        help="packing: also run both modes with the dense block-diagonal mask, interleaved",
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    torch.set_num_threads(1)
    model_cfg = get_config(args.model)
    base = TrainConfig(stage=2, trainable="all", log_every=args.log_every).replace(
        optimizer={"lr": 1e-4},
        batch={
            "micro_batch_size": args.micro_batch_size,
            "max_length": args.max_length,
            "max_images_per_row": 8,
        },
        memory={"zero_stage": args.zero_stage},
    )
    print(f"load average at start: {_load_avg()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "packing"):
            data = Path(tmp) / "packing"
            manifest = write_data(data, model_cfg, args.packing_samples, args.max_length)
            attentions = ("segments", "dense-mask") if args.dense_mask else ("segments",)
            shards = shards_from_manifest(manifest, data)
            bench_packing(model_cfg, shards, base, args.repeats, attentions)
        if args.only in (None, "overhead"):
            data = Path(tmp) / "overhead"
            shards = shards_from_manifest(
                write_data(data, model_cfg, args.samples, args.max_length), data
            )
            consumed = bench_overhead(model_cfg, shards, base, warmup=args.warmup, steps=args.steps)
            bench_loader(model_cfg, shards, base, consumed)
    print(f"load average at end: {_load_avg()}")


if __name__ == "__main__":
    main()
