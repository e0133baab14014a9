"""Benchmark: the tokenize_captions step vs raw `tokenizer(batch)` on the same captions.

Prints tokens/s of both and their ratio (target >= 0.7x; the step includes templating, Ray Data,
label building, Arrow writing and digests), and the peak memory of the step (driver + its Ray
processes) at N and 4N samples: streaming means the two should be close.

    .venv/bin/python bench/bench_tokenize.py --num-samples 50000 --repeats 3

Each size runs in its own subprocess so peak-memory numbers do not carry over. Within a size the
raw tokenizer and the step alternate (raw, step, raw, step, ...) so both see the same load; the
first step run is reported apart ("cold": its Ray workers start and import the step's code).
Both sides get the machine's 2 cores: the raw call's Rust tokenizer spreads a batch over its
thread pool (its measured CPU use is printed), the step runs on a 2-CPU local Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

WORDS = [
    "a",
    "an",
    "the",
    "red",
    "blue",
    "green",
    "yellow",
    "circle",
    "square",
    "triangle",
    "small",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "on",
    "in",
    "near",
    "two",
    "three",
    "shapes",
    "picture",
    "of",
    "with",
    "and",
    "next",
    "to",
    "photo",
    "showing",
    "bright",
    "dark",
]
ROWS_PER_FILE = 10_000


def make_filter_output(root: Path, num_samples: int, seed: int = 0) -> list[str]:
    """Parquet shards shaped like the filter step's output; returns the captions."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    image = buf.getvalue()
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(6, 20))) for _ in range(num_samples)]
    (root / "shards").mkdir(parents=True)
    from owl.data.manifest import Manifest

    manifest = Manifest(step="filter")
    for start in range(0, num_samples, ROWS_PER_FILE):
        part = captions[start : start + ROWS_PER_FILE]
        rel = f"shards/{start // ROWS_PER_FILE:05d}.parquet"
        table = pa.table(
            {
                "key": [f"{start + i:09d}" for i in range(len(part))],
                "url": [f"file:///img/{start + i}.png" for i in range(len(part))],
                "caption": part,
                "image": [image] * len(part),
            }
        )
        pq.write_table(table, root / rel, row_group_size=1024)  # as the filter step writes
        manifest.add_file(root, rel, rows=len(part))
    manifest.write(root)
    return captions


class PeakMemory:
    """Samples the RSS of this process plus its descendants (the local Ray cluster)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process that just exited
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _raw_tokens(tokenizer: object, captions: list[str]) -> tuple[int, float, float]:
    """(text tokens, wall s, CPU s of this process) of `tokenizer(batch)` over 512-caption batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    num_tokens = 0
    for i in range(0, len(captions), 512):
        num_tokens += sum(len(ids) for ids in tokenizer(captions[i : i + 512]).input_ids)
    return num_tokens, time.perf_counter() - wall, time.process_time() - cpu


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (the local Ray cluster:
    GCS, raylet and workers); processes that already exited are not counted."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def run_one(num_samples: int, repeats: int) -> dict[str, object]:
    """One size: raw tokenizer and step runs interleaved, step peak memory."""
    import ray

    from owl.data.manifest import Manifest
    from owl.data.tokenize import load_tokenizer, train_bpe_tokenizer
    from owl.model.config import AbstractorConfig, DecoderConfig, OwlConfig
    from pipelines.step import Resources, StepContext, StepInput
    from pipelines.steps import tokenize_captions

    root = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    captions = make_filter_output(root / "filter", num_samples)
    train_bpe_tokenizer(captions[:5000], 2048, root / "tok/tokenizer")
    (root / "tok").mkdir(exist_ok=True)
    Manifest(step="tokenizer").write(root / "tok")
    tokenizer = load_tokenizer(root / "tok/tokenizer")

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    model = OwlConfig(
        name="bench",
        variant="owl2",
        abstractor=AbstractorConfig(num_queries=64),
        decoder=DecoderConfig(max_positions=256),
    )
    inputs = {
        "data": StepInput("filter", root / "filter", Manifest.read(root / "filter")),
        "tokenizer": StepInput("tokenizer", root / "tok", Manifest.read(root / "tok")),
    }
    raw_s, raw_cpu, step_s, step_cpu, digests = [], [], [], [], set()
    raw_tokens = 0
    with PeakMemory() as memory:
        for repeat in range(repeats):
            raw_tokens, wall, cpu = _raw_tokens(tokenizer, captions)
            raw_s.append(wall)
            raw_cpu.append(cpu)
            ctx = StepContext(
                step="tokenize_captions",
                out_dir=root / f"out{repeat}",
                job_name="bench",
                model=model,
                resources=Resources(num_workers=2),
            )
            ctx.out_dir.mkdir()
            start, cpu = time.perf_counter(), _tree_cpu_seconds()
            manifest = tokenize_captions.run(ctx, tokenize_captions.Config(), inputs)
            step_s.append(time.perf_counter() - start)
            step_cpu.append(_tree_cpu_seconds() - cpu)
            assert manifest.stats["samples_out"] == num_samples
            digests.add(manifest.digest)
    ray.shutdown()
    assert len(digests) == 1, "the step's output changed between runs"
    return {
        "num_samples": num_samples,
        "text_tokens": raw_tokens,
        "raw_s": raw_s,
        "raw_cpu_s": raw_cpu,
        "step_s": step_s,  # same text tokens, the step's wall time
        "step_cpu_s": step_cpu,
        "load_average": os.getloadavg()[0],
        "peak_rss_mb": memory.peak / 2**20,
    }


def _report(r: dict) -> str:
    tokens, raw, step = r["text_tokens"], r["raw_s"], r["step_s"]
    lines = [
        f"N={r['num_samples']:,}: {tokens:,} text tokens; step peak RSS "
        f"{r['peak_rss_mb']:,.0f} MiB; 1-min load average at the end {r['load_average']:.1f}",
        "  run      raw s (CPU s)  step s (CPU s)  ratio = raw s / step s = step tok/s / raw tok/s",
    ]
    for i, (a, b) in enumerate(zip(raw, step)):
        lines.append(
            f"  {i + 1}{' cold' if i == 0 else '     '}  {a:6.2f} ({r['raw_cpu_s'][i]:5.2f})"
            f"  {b:6.2f} ({r['step_cpu_s'][i]:5.2f})   {a / b:.2f}x"
        )
    warm_raw, warm_step = statistics.median(raw[1:] or raw), statistics.median(step[1:] or step)
    lines.append(
        f"  warm medians: raw {tokens / warm_raw:,.0f} tok/s, step {tokens / warm_step:,.0f} "
        f"tok/s, ratio {warm_raw / warm_step:.2f}x; cold ratio {raw[0] / step[0]:.2f}x"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=50_000, help="N (4N is run too)")
    parser.add_argument("--repeats", type=int, default=3, help="raw/step pairs per size")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.repeats)))
        return
    print(f"load average before: {os.getloadavg()}")
    results = []
    for n in (args.num_samples, 4 * args.num_samples):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--repeats", str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(_report(results[-1]), flush=True)
    print(f"peak memory 4N / N: {results[1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
