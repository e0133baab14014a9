"""Cost of evaluation during training on the demo: stage 2 of jobs/demo.yaml without and with
`evaluate.every`, in one invocation, on the same upstream outputs (computed by the first run,
cached for the next); the ratio of the stage's wall time (its manifest's `wall_time_s`: Ray Train
start to the last score) with evaluation to without (target <= 1.10). The runs alternate:
baseline, evaluated, then with `--repeats 2` each again; stage 2 always trains (`--force
stage2`); each mode keeps its median.

    .venv/bin/python bench/bench_train_eval.py                   # the demo as it is (long)
    .venv/bin/python bench/bench_train_eval.py --small --steps 300 --every 100

`--small` shrinks the data before stage 2 (fewer images, stage 1 of 20 steps) to save time; stage
2 keeps the demo's model, batch, length and workers, so its steps cost what the demo's do. The
evaluation scores the demo's held-out VQA (`--limit` items) on `--eval-workers` actors of
`--eval-cpus` CPUs each (0: they share the training workers' cores, as on a machine whose every
core trains).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "shapes.num_caption_images=480", "shapes.num_instruction_images=960", "shapes.num_text=120",
    "download.number_sample_per_shard=480", "stage1.schedule.max_steps=20",
    "stage1.checkpoint.every=20",
]  # fmt: skip


def owl_run(storage: Path, settings: list[str]) -> dict:
    """`owl run` up to stage 2, which always trains (`--force stage2`: an earlier invocation's
    output would be a cache hit); the upstream steps are reused. Returns stage 2's manifest."""
    args = ["run", "jobs/demo.yaml", "--until", "stage2", "--set", f"storage={storage}"]
    for item in settings:
        args += ["--set", item]
    args += ["--force", "stage2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"owl {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    stage = next(s for s in result["steps"] if s["step"] == "stage2")
    return json.loads((storage / "steps" / "stage2" / stage["key"] / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1800, help="stage 2 steps (demo: 1800)")
    parser.add_argument("--every", type=int, default=600, help="evaluate.every (steps)")
    parser.add_argument("--limit", type=int, default=100, help="VQA items scored each time")
    parser.add_argument("--eval-workers", type=int, default=1)
    parser.add_argument("--eval-cpus", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="smaller data before stage 2")
    parser.add_argument("--storage", default="", help="storage root (default: a temp folder)")
    args = parser.parse_args()

    storage = Path(args.storage or tempfile.mkdtemp(prefix="owl-bench-train-eval-"))
    base = [f"stage2.schedule.max_steps={args.steps}", f"stage2.checkpoint.every={args.every}"]
    base += SMALL if args.small else []
    evaluated = base + [
        f"stage2.evaluate.every={args.every}",
        "stage2.evaluate.benchmarks=['@shapes/benchmarks/vqa.jsonl']",
        f"stage2.evaluate.limit={args.limit}",
        f"stage2.evaluate.num_workers={args.eval_workers}",
        f"stage2.evaluate.cpus_per_worker={args.eval_cpus}",
        "stage2.evaluate.vqa_rule=normalized",  # the demo's evaluate rule
    ]
    walls: dict[str, list[float]] = {"baseline": [], "evaluated": []}
    for _ in range(args.repeats):
        for mode, settings in (("baseline", base), ("evaluated", evaluated)):
            stats = owl_run(storage, settings)["stats"]
            walls[mode].append(stats["wall_time_s"])
            extra = {k: round(v, 1) for k, v in stats.items() if k.startswith("eval_")}
            print(f"{mode}: stage 2 {stats['wall_time_s']:.1f}s, loss {stats['final_loss']:.4f}"
                  f"{', ' + json.dumps(extra) if extra else ''}", flush=True)  # fmt: skip
    baseline, evaluated_s = (statistics.median(walls[m]) for m in ("baseline", "evaluated"))
    print(json.dumps({
        "steps": args.steps, "evaluate_every": args.every, "limit": args.limit,
        "small": args.small, "baseline_s": round(baseline, 1), "evaluated_s": round(evaluated_s, 1),
        "ratio": round(evaluated_s / baseline, 3), "load_average": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
