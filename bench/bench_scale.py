"""Benchmark: the training loader at 1M, 5M and 20M caption samples, per rank.

Writes tokenized caption shards as the tokenize step does (ShardWriter: `shard-NNNNN.arrow` of
`--rows-per-shard` rows plus its index, listed with sha256 in a manifest): synthetic token ids
shaped like the demo's captions (BOS, 17 image slots, 10-29 supervised text tokens) and one small
PNG per sample (the same bytes for every sample, to keep the disk use down: ~0.45 KB/sample).
The largest size is written once; the smaller sizes are the manifests of its first shards.

Then, per size, `--ranks` processes start at once, each one rank of the streaming loader
(`owl.data.streaming.StreamingLoader`, the digests checked lazily as in training) and report:
start-up (manifest read -> shard refs -> constructor: shard permutation, calibration from the
first buffer's indexes; wall and CPU time: the CPU time is what a loaded machine does not blur),
time to the first micro-batch (its first shard's sha256 + a buffer planned), micro-batches/s
over `--batches` collated batches (images decoded and resized, as training gets them), the
shards it opened, and its peak RSS (VmHWM; also the peak after imports, before the loader).
The earlier whole-dataset loader (`ShardLoader`, data.loader=global) runs as the baseline at
`--baseline-sizes` in the same invocation.

    .venv/bin/python bench/bench_scale.py --out /tmp/owl-bench-scale --sizes 1M,5M,20M
    .venv/bin/python bench/bench_scale.py --out /tmp/owl-bench-scale --clean   # removes the data

Micro-batches are the demo's stage-1 ones: 12 packed rows of 256 tokens, 8 images per row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_VISUAL = 17  # the demo model's image slots


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _png() -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_data(out: Path, total: int, rows_per_shard: int, chunk: int = 100_000) -> list[dict]:
    """Tokenized shards of `total` samples; returns the manifest's file entries (as dicts)."""
    import numpy as np
    import pyarrow as pa

    from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
    from owl.data.manifest import Manifest
    from owl.data.shards import ShardWriter, images_column, make_flat_batch

    rng = np.random.default_rng(0)
    image = _png()
    started = time.perf_counter()
    with ShardWriter(out, rows_per_shard) as writer:
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            text = rng.integers(10, 30, n)
            lengths = 1 + NUM_VISUAL + text
            offsets = np.zeros(n + 1, np.int32)
            np.cumsum(lengths, out=offsets[1:])
            ids = rng.integers(3, 512, int(offsets[-1])).astype(np.int32)
            labels = ids.copy()
            prompt = np.zeros(len(ids), bool)  # BOS + image slots: no loss
            for k in range(1 + NUM_VISUAL):
                prompt[offsets[:-1] + k] = True
            ids[prompt] = IMAGE_TOKEN_ID
            ids[offsets[:-1]] = 1  # BOS
            labels[prompt] = IGNORE_INDEX
            images = images_column(np.ones(n, np.int32), pa.array([image] * n, pa.binary()))
            keys = pa.array([f"s{start + i}" for i in range(n)])
            writer.write(
                make_flat_batch(
                    keys, ["multimodal"] * n, ids, labels, offsets, images, ["bench"] * n
                )  # fmt: skip
            )
            print(f"  wrote {start + n:,} samples ({time.perf_counter() - started:.0f} s)",
                  flush=True)  # fmt: skip
        shards = writer.close()
    manifest = Manifest(step="bench_scale")
    for shard in shards:
        manifest.add_file(out, shard.path, rows=shard.rows, tokens=shard.tokens)
        manifest.add_file(out, shard.index, rows=shard.rows)
    manifest.write(out)
    return [vars(f) for f in manifest.files]


def _manifest_for(out: Path, size: int, rows_per_shard: int) -> Path:
    """A manifest listing the first `size` samples' shards (and indexes), in its own folder."""
    from owl.data.manifest import Manifest

    full = Manifest.read(out)
    keep = {f"shards/shard-{i:05d}" for i in range(-(-size // rows_per_shard))}
    sub = Manifest(step="bench_scale")
    sub.files = [f for f in full.files if f.path.split(".")[0] in keep]  # shard + its index
    folder = out / f"manifest-{size}"
    folder.mkdir(exist_ok=True)
    sub.write(folder)
    return folder


def _virtual(out: Path, size: int, rows_per_shard: int) -> Path:
    """A dataset of `size` samples made of symlinks to the written shards (each used several
    times under other names): what a rank reads at start-up (manifest, shard rows, a few
    indexes) is that of a real dataset of this size."""
    from owl.data.manifest import Manifest

    full = {f.path: f for f in Manifest.read(out).files}
    real = sum(1 for p in full if p.endswith(".arrow"))
    folder = out / f"virtual-{size}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "shards").mkdir(parents=True)
    manifest = Manifest(step="bench_scale")
    for i in range(-(-size // rows_per_shard)):
        for suffix in (".arrow", ".index.npy"):
            source = full[f"shards/shard-{i % real:05d}{suffix}"]
            name = f"shards/shard-{i:05d}{suffix}"
            os.symlink(out / source.path, folder / name)
            manifest.files.append(type(source)(**{**vars(source), "path": name}))
    manifest.write(folder)
    return folder


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One rank: build the loader, draw batches, print one JSON line."""
    import torch

    from owl.data.loader import LoaderConfig, ShardLoader, shards_from_manifest
    from owl.data.manifest import Manifest
    from owl.data.streaming import StreamingLoader

    torch.set_num_threads(1)
    rss_imports = _peak_rss_mb()
    cfg = LoaderConfig(micro_batch_size=12, max_length=256, max_images_per_row=8, image_size=32)
    started, cpu = time.perf_counter(), time.process_time()
    manifest = Manifest.read(args.manifest)
    shards = shards_from_manifest(manifest, args.data)
    kind = StreamingLoader if args.loader == "streaming" else ShardLoader
    loader = kind(shards, cfg, rank=args.rank, world_size=args.ranks, verify=True)
    startup, startup_cpu = time.perf_counter() - started, time.process_time() - cpu
    next(loader)
    first = time.perf_counter() - started
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(loader)
    rate = args.batches / (time.perf_counter() - t0)
    cpu_rate = args.batches / (time.process_time() - c0)  # per CPU-second: load-independent
    opened = len(getattr(loader, "_verified", ())) or len(shards)
    print(json.dumps({
        "rank": args.rank, "startup_s": startup, "startup_cpu_s": startup_cpu, "first_batch_s": first, "batches_per_s": rate, "batches_per_cpu_s": cpu_rate,
        "rss_after_imports_mb": rss_imports,
        "peak_rss_mb": _peak_rss_mb(),
        "batches_per_epoch": loader.batches_per_epoch(0), "shards_opened": opened,
        "shards": sum(1 for s in shards),
    }))  # fmt: skip


def measure(
    data: Path, manifest: Path, loader: str, ranks: int, batches: int, only: list[int] | None = None
) -> list[dict]:
    """Ranks `only` (default: all) of a `ranks`-rank run, started at once."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--data",
                str(data),
                "--manifest",
                str(manifest),
                "--loader",
                loader,
                "--rank",
                str(r),
                "--ranks",
                str(ranks),
                "--batches",
                str(batches),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for r in (only if only is not None else range(ranks))
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"rank failed ({proc.returncode}): {out}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _print(size: int, what: str, per_rank: list[dict]) -> None:
    """The worst rank's numbers (slowest start-up, largest RSS, lowest rate)."""
    worst = {
        k: max(r[k] for r in per_rank)
        for k in (
            "startup_s",
            "startup_cpu_s",
            "first_batch_s",
            "peak_rss_mb",
            "rss_after_imports_mb",
        )
    }
    rate = min(r["batches_per_s"] for r in per_rank)
    cpu_rate = min(r["batches_per_cpu_s"] for r in per_rank)
    opened = max(r["shards_opened"] for r in per_rank)
    print(
        f"{size:>11,} {what}: start-up {worst['startup_s']:.2f} s "
        f"(CPU {worst['startup_cpu_s']:.2f} s), first batch "
        f"{worst['first_batch_s']:.2f} s, peak RSS {worst['peak_rss_mb']:.0f} MiB "
        f"(after imports {worst['rss_after_imports_mb']:.0f}), {rate:.1f} batches/s "
        f"({cpu_rate:.1f} per CPU-second), "
        f"shards opened {opened}/{per_rank[0]['shards']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/owl-bench-scale"))
    parser.add_argument("--sizes", default="1M,5M,20M")
    parser.add_argument("--baseline-sizes", default="1M")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument(
        "--virtual",
        default="348M",
        help="also a dataset of this size made of symlinks to the written shards",
    )
    parser.add_argument(
        "--virtual-ranks",
        type=int,
        default=64,
        help="read by this many ranks (ranks 0 and the last one are run)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--clean", action="store_true", help="remove --out and exit")
    # internal: one rank
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loader", default="streaming", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.clean:
        shutil.rmtree(args.out, ignore_errors=True)
        print(f"removed {args.out}")
        return
    sizes = sorted(_size(s) for s in args.sizes.split(",") if s)
    baseline = {_size(s) for s in args.baseline_sizes.split(",") if s}
    need = max(sizes + list(baseline), default=0)  # 0: use what is written (--virtual only)
    marker = args.out / f"written-{need}-{args.rows_per_shard}"
    if need and not marker.exists():
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        print(f"writing {need:,} samples to {args.out}", flush=True)
        started = time.perf_counter()
        write_data(args.out, need, args.rows_per_shard)
        print(f"  wrote and hashed in {time.perf_counter() - started:.0f} s", flush=True)
        marker.touch()
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"({os.cpu_count()} CPUs)", flush=True)  # fmt: skip
    rows = []
    for size in sorted(set(sizes) | baseline):
        manifest = _manifest_for(args.out, size, args.rows_per_shard)
        loaders = ["streaming"] + (["global"] if size in baseline else [])
        for loader in loaders:
            per_rank = measure(args.out, manifest, loader, args.ranks, args.batches)
            rows.append({"samples": size, "loader": loader, "ranks": per_rank})
            _print(size, loader, per_rank)
    if args.virtual:
        size = _size(args.virtual)
        folder = _virtual(args.out, size, args.rows_per_shard)
        last = args.virtual_ranks - 1
        per_rank = measure(folder, folder, "streaming", args.virtual_ranks, args.batches, [0, last])
        rows.append({"samples": size, "loader": "streaming", "virtual": True,
                     "world_size": args.virtual_ranks, "ranks": per_rank})  # fmt: skip
        _print(size, f"streaming, ranks 0 and {last} of {args.virtual_ranks} (symlinked)", per_rank)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
