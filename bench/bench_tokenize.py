"""Benchmark: the tokenize_captions step vs raw `tokenizer(batch)` on the same captions.

Prints tokens/s of both and their ratio (target >= 0.7x; the step includes templating, Ray Data,
label building, Arrow writing and digests), and the peak memory of the step (driver + its Ray
processes) at N and 4N samples: streaming means the two should be close.

    .venv/bin/python bench/bench_tokenize.py --num-samples 50000 --repeats 3
    .venv/bin/python bench/bench_tokenize.py --sizes 1M,5M,20M --out /tmp/owl-bench-tok  # at scale

Each size runs in its own subprocess so peak-memory numbers do not carry over. Within a size the
raw tokenizer and the step alternate (raw, step, raw, step, ...) so both see the same load; the
first step run is reported apart ("cold": its Ray workers start and import the step's code).
Both sides get the machine's 2 cores: the raw call's Rust tokenizer spreads a batch over its
thread pool (its measured CPU use is printed), the step runs on a 2-CPU local Ray.

`--sizes` (the scale mode, issue 14): the filter-like parquet input of the largest size is
written once under `--out` (captions built column-wise with pyarrow, so 20M of them fit in the
driver's memory), the smaller sizes being its first files. Per size, in a fresh process on a
fresh 2-CPU local Ray: one warm-up step run on one file (the cold start, reported apart), then
the raw tokenizer over a `--raw-samples` sample of the size's captions (files spread over the
whole input), the step over the whole size, and the raw sample again; the ratio is the step's
text tokens/s (its manifest's supervised tokens minus one EOS per sample) over the mean of the
two raw passes' tokens/s. The raw side is the tokenizer call alone, per 512-caption batch: its
per-caption cost does not depend on the dataset's size, so a sample of it is the baseline at
every size (the two passes bracket the step, so a load change shows as their spread). The
step's output is deleted after each size; `--clean` removes the input.
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
from typing import TYPE_CHECKING

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

if TYPE_CHECKING:
    from owl.data.manifest import Manifest

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
    from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer
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


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def write_scale_input(out: Path, total: int, seed: int = 0) -> None:
    """Filter-like parquet files of ROWS_PER_FILE captions under out/filter/shards, the captions
    drawn as in `make_filter_output` but built column-wise (pyarrow), file by file; files already
    there are kept (a later invocation reuses them)."""
    import numpy as np
    import pyarrow.compute as pc

    shards = out / "filter" / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    words = pa.array(WORDS)
    started = time.perf_counter()
    for index, start in enumerate(range(0, total, ROWS_PER_FILE)):
        path = shards / f"{index:05d}.parquet"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, index])  # a file's rows do not depend on `total`
        n = min(ROWS_PER_FILE, total - start)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(rng.integers(6, 21, n), out=offsets[1:])
        values = words.take(pa.array(rng.integers(0, len(WORDS), int(offsets[-1]))))
        captions = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), values), " ")
        table = pa.table(
            {
                "key": [f"{start + i:09d}" for i in range(n)],
                "url": [f"file:///img/{start + i}.png" for i in range(n)],
                "caption": captions,
                "image": pa.array([buf.getvalue()] * n, pa.binary()),
            }
        )
        pq.write_table(table, path.with_suffix(".tmp"), row_group_size=1024)
        path.with_suffix(".tmp").rename(path)
        if index % 100 == 99:
            print(f"  wrote {start + n:,} captions ({time.perf_counter() - started:.0f} s)",
                  flush=True)  # fmt: skip


def _input_manifest(out: Path, num_samples: int) -> Manifest:
    """The first files of out/filter holding `num_samples` rows, listed without digests (the step
    reads the paths only; hashing 4 GB of input per size would only slow the bench)."""
    from owl.data.manifest import FileEntry, Manifest

    manifest = Manifest(step="filter")
    for index in range(-(-num_samples // ROWS_PER_FILE)):
        rel = f"shards/{index:05d}.parquet"
        size = (out / "filter" / rel).stat().st_size
        rows = min(ROWS_PER_FILE, num_samples - index * ROWS_PER_FILE)
        manifest.files.append(FileEntry(path=rel, size=size, sha256="", rows=rows))
    return manifest


def _raw_sample(out: Path, num_samples: int, raw_samples: int) -> list[str]:
    """About `raw_samples` captions from whole files spread evenly over the size's files."""
    num_files = -(-num_samples // ROWS_PER_FILE)
    take = max(1, min(num_files, -(-raw_samples // ROWS_PER_FILE)))
    captions: list[str] = []
    for k in range(take):
        path = out / "filter" / f"shards/{k * num_files // take:05d}.parquet"
        captions += pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
    return captions


def run_scale(out: Path, num_samples: int, raw_samples: int) -> dict[str, object]:
    """One size: cold warm-up run, raw sample, the step over every caption, raw sample again."""
    import shutil

    import ray

    from owl.data.manifest import Manifest
    from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from owl.model.config import AbstractorConfig, DecoderConfig, OwlConfig
    from pipelines.step import Resources, StepContext, StepInput
    from pipelines.steps import tokenize_captions

    tok_dir = out / "tok"
    if not (tok_dir / "manifest.json").exists():  # one tokenizer for every size
        first = pq.read_table(out / "filter/shards/00000.parquet", columns=["caption"])
        train_bpe_tokenizer(first.column("caption").to_pylist()[:5000], 2048, tok_dir / "tokenizer")
        Manifest(step="tokenizer").write(tok_dir)
    tokenizer = load_tokenizer(tok_dir / "tokenizer")
    raw_captions = _raw_sample(out, num_samples, raw_samples)

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    for attempt in range(3):  # Ray gives its raylet 30 s to register: not enough at load ~60
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    model = OwlConfig(
        name="bench",
        variant="owl2",
        abstractor=AbstractorConfig(num_queries=64),
        decoder=DecoderConfig(max_positions=256),
    )
    tok_input = StepInput("tokenizer", tok_dir, Manifest.read(tok_dir))

    def step(size: int, name: str) -> tuple[Manifest, float, float, float]:
        ctx = StepContext(
            step="tokenize_captions",
            out_dir=out / name,
            job_name="bench",
            model=model,
            resources=Resources(num_workers=2),
        )
        shutil.rmtree(ctx.out_dir, ignore_errors=True)
        ctx.out_dir.mkdir()
        data = StepInput("filter", out / "filter", _input_manifest(out, size))
        start, cpu = time.perf_counter(), _tree_cpu_seconds()
        with PeakMemory() as memory:
            manifest = tokenize_captions.run(
                ctx, tokenize_captions.Config(), {"data": data, "tokenizer": tok_input}
            )
        wall, cpu = time.perf_counter() - start, _tree_cpu_seconds() - cpu
        shutil.rmtree(ctx.out_dir)
        assert manifest.stats["samples_out"] == size, manifest.stats
        return manifest, wall, cpu, memory.peak / 2**20

    _, cold_s, cold_cpu, _ = step(ROWS_PER_FILE, "out-warmup")
    raw = [_raw_tokens(tokenizer, raw_captions)]
    manifest, step_s, step_cpu, peak = step(num_samples, "out")
    raw.append(_raw_tokens(tokenizer, raw_captions))
    ray.shutdown()
    stats = manifest.stats
    return {
        "num_samples": num_samples,
        "step_text_tokens": int(stats["supervised_tokens"] - stats["samples_out"]),  # minus EOS
        "step_shards": int(stats["shards"]),
        "step_s": step_s,
        "step_cpu_s": step_cpu,
        "step_peak_rss_mb": peak,
        "cold_s": cold_s,
        "cold_cpu_s": cold_cpu,
        "raw_captions": len(raw_captions),
        "raw_tokens": raw[0][0],
        "raw_s": [r[1] for r in raw],
        "raw_cpu_s": [r[2] for r in raw],
        "load_average": os.getloadavg(),
    }


def _report_scale(r: dict) -> str:
    raw_rate = statistics.mean(r["raw_tokens"] / s for s in r["raw_s"])
    step_rate = r["step_text_tokens"] / r["step_s"]
    n = r["num_samples"]
    raw_rates = ", ".join(f"{r['raw_tokens'] / s:,.0f}" for s in r["raw_s"])
    raw_cpu = ", ".join(f"{c:.1f}" for c in r["raw_cpu_s"])
    return (
        f"N={n:,}: step {r['step_s']:.1f} s ({r['step_cpu_s']:.1f} CPU-s), "
        f"{step_rate:,.0f} text tok/s, {1e6 * r['step_s'] / n:.1f} us/sample wall, "
        f"{1e6 * r['step_cpu_s'] / n:.1f} us/sample CPU, peak RSS {r['step_peak_rss_mb']:,.0f} MiB, "
        f"{r['step_shards']} shards; raw ({r['raw_captions']:,} captions, before / after): "
        f"{raw_rates} tok/s (CPU-s {raw_cpu}); "
        f"ratio step / raw {step_rate / raw_rate:.2f}x; cold warm-up run "
        f"{r['cold_s']:.1f} s ({r['cold_cpu_s']:.1f} CPU-s) for {ROWS_PER_FILE:,}; "
        f"load average at the end {r['load_average'][0]:.1f}"
    )


def main_scale(args: argparse.Namespace) -> None:
    sizes = [_size(s) for s in args.sizes.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    write_scale_input(args.out, max(sizes))
    for n in sizes:
        proc = subprocess.run(
            [sys.executable, __file__, "--out", str(args.out), "--scale-one", str(n),
             "--raw-samples", str(args.raw_samples)],
            check=True, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        # stderr passes through: a failing size shows its traceback
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(_report_scale(result), flush=True)
        print(json.dumps(result), flush=True)
    print(f"load average after: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=50_000, help="N (4N is run too)")
    parser.add_argument("--repeats", type=int, default=3, help="raw/step pairs per size")
    parser.add_argument("--sizes", help="scale mode: sizes to run, e.g. 1M,5M,20M")
    parser.add_argument("--out", type=Path, default=Path("/tmp/owl-bench-tok"))
    parser.add_argument("--raw-samples", type=int, default=500_000)
    parser.add_argument("--clean", action="store_true", help="remove --out and exit")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size
    parser.add_argument("--scale-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clean:
        import shutil

        shutil.rmtree(args.out, ignore_errors=True)
        return
    if args.scale_one:
        print(json.dumps(run_scale(args.out, args.scale_one, args.raw_samples)))
        return
    if args.sizes:
        main_scale(args)
        return
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
