"""Benchmark: peak memory of reading a large LLaVA instruction JSON, whole vs streamed.

Writes a LLaVA-style JSON array of N samples (665k is LLaVA-Instruct-665k's size), then in a
fresh process each, measures peak RSS of:
- whole: `json.load` of the file and the records kept as rows (what tokenize_instructions did);
- streamed: `tokenize_instructions._write_records` (ijson over the array, rows written to parquet
  work files of 2,048 as they come), the step's read phase now.

    .venv/bin/python bench/bench_instruction_read.py --num-samples 665000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def write_llava(path: Path, num_samples: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(num_samples):
            record = {
                "id": f"{i:012d}",
                "image": f"coco/train2017/{i:012d}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat is in the picture number {i}?"},
                    {"from": "gpt", "value": "A red circle to the left of a blue square. " * 3},
                    {"from": "human", "value": "How many shapes are there?"},
                    {"from": "gpt", "value": "There are two shapes."},
                ],
            }
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")


def measure(mode: str, path: Path) -> dict[str, float]:
    from owl.data.sources import Record, SourceSpec, _parse
    from pipelines.steps.tokenize_instructions import _write_records

    spec = SourceSpec("llava", str(path))
    start = time.perf_counter()
    if mode == "whole":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        rows = []
        for index, obj in enumerate(data):
            record = _parse(spec, obj, index, str(path.parent))
            if isinstance(record, Record):
                rows.append(
                    {
                        "sample_id": record.sample_id,
                        "turns": json.dumps([[t.role, t.text] for t in record.turns]),
                        "images": json.dumps(record.images),
                        "source": record.source,
                    }
                )
        num_rows = len(rows)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench_read_"))
        _, num_rows = _write_records([spec], work, 2048, 128, Counter())
    return {
        "rows": num_rows,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=665_000)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: mode, path
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], Path(args.one[1]))))
        return
    path = Path(tempfile.mkdtemp(prefix="bench_read_")) / "llava.json"
    write_llava(path, args.num_samples)
    print(f"{args.num_samples:,} samples, {path.stat().st_size / 2**20:,.0f} MiB of JSON")
    for mode in ("whole", "streamed"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", mode, str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{mode:>8}: {r['rows']:,} rows in {r['seconds']:.1f} s, "
            f"peak RSS {r['peak_rss_mb']:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
