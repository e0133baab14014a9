"""A fully cached re-run of a job against its first run: wall time of two `owl run` processes on
a fresh storage folder. The target is a ratio <= 0.05.

    python bench/bench_cached_rerun.py jobs/demo.yaml [--set stage1.schedule.max_steps=20 ...] [--storage DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.05


def timed_run(job: str, overrides: list[str]) -> tuple[float, dict]:
    command = [sys.executable, "-m", "pipelines.cli", "run", job, "--json"]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"owl run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds, json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="job file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE"
    )
    parser.add_argument("--storage", default="", help="storage folder (default: a new temp folder)")
    args = parser.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="owl-bench-")
    overrides = [*args.overrides, f"storage={storage}"]
    first_s, first = timed_run(args.job, overrides)
    cached_s, cached = timed_run(args.job, overrides)
    states = {s["step"]: s["state"] for s in cached["steps"]}
    ratio = cached_s / first_s
    result = {
        "job": args.job,
        "storage": storage,
        "first_run_s": round(first_s, 2),
        "cached_run_s": round(cached_s, 2),
        "ratio": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "all_cached": set(states.values()) == {"cached"},
        "first_run_states": {s["step"]: s["state"] for s in first["steps"]},
    }
    print(json.dumps(result, indent=2))
    return 0 if result["all_cached"] and ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
