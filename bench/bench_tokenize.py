"""Benchmark: the tokenize_captions step vs raw `tokenizer(batch)` on the same captions.

Prints tokens/s of both and their ratio (target >= 0.7x; the step includes templating, Ray Data,
Arrow writing and digests), and the peak memory of the step (driver + its Ray processes) at N
and 4N samples: streaming means the two should be close.

    .venv/bin/python bench/bench_tokenize.py --num-samples 50000

Each size runs in its own subprocess so peak-memory numbers do not carry over.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
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
        pq.write_table(table, root / rel)
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


def run_one(num_samples: int) -> dict[str, float]:
    """One size: raw tokenizer throughput, step throughput, step peak memory."""
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

    start = time.perf_counter()
    raw_tokens = 0
    for i in range(0, len(captions), 512):
        raw_tokens += sum(len(ids) for ids in tokenizer(captions[i : i + 512]).input_ids)
    raw_s = time.perf_counter() - start

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    model = OwlConfig(
        name="bench",
        variant="owl2",
        abstractor=AbstractorConfig(num_queries=64),
        decoder=DecoderConfig(max_positions=256),
    )
    ctx = StepContext(
        step="tokenize_captions",
        out_dir=root / "out",
        job_name="bench",
        model=model,
        resources=Resources(num_workers=2),
    )
    ctx.out_dir.mkdir()
    inputs = {
        "data": StepInput("filter", root / "filter", Manifest.read(root / "filter")),
        "tokenizer": StepInput("tokenizer", root / "tok", Manifest.read(root / "tok")),
    }
    with PeakMemory() as memory:
        start = time.perf_counter()
        manifest = tokenize_captions.run(ctx, tokenize_captions.Config(batch_size=1024), inputs)
        step_s = time.perf_counter() - start
    ray.shutdown()
    assert manifest.stats["samples_out"] == num_samples
    return {
        "num_samples": num_samples,
        "text_tokens": raw_tokens,
        "raw_tokens_per_s": raw_tokens / raw_s,
        "step_tokens_per_s": raw_tokens / step_s,  # same text tokens, the step's wall time
        "ratio": raw_s / step_s,
        "step_s": step_s,
        "peak_rss_mb": memory.peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=50_000, help="N (4N is run too)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = []
    for n in (args.num_samples, 4 * args.num_samples):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n)], check=True, capture_output=True, text=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(
            f"N={r['num_samples']:>8}  raw {r['raw_tokens_per_s']:>12,.0f} tok/s  "
            f"step {r['step_tokens_per_s']:>12,.0f} tok/s  ratio {r['ratio']:.2f}x  "
            f"step {r['step_s']:.1f}s  peak RSS {r['peak_rss_mb']:.0f} MiB"
        )
    print(f"peak memory 4N / N: {results[1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
