"""`owl compare A B`: per benchmark, A's headline metric minus B's over the items both scored,
with a paired bootstrap interval and p-value (owl.eval.uncertainty).

A and B are evaluate step outputs (a folder with `units/`), MLflow run ids of evaluate steps, or
registered model versions (`NAME`, `NAME@alias`, `NAME/version`: the evaluation their
registering run read); the last two are read from MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="A - B per benchmark: paired bootstrap interval and p-value"
    )
    for name in ("a", "b"):
        p.add_argument(name, metavar=name.upper(), help="an evaluate step's output folder, its "
                       "MLflow run id, or a model version NAME, NAME@alias, NAME/version")  # fmt: skip
    p.add_argument("--mlflow-uri", default="", help="tracking URI (default: from --job, else "
                   "MLFLOW_TRACKING_URI); needed for run ids and model versions")  # fmt: skip
    p.add_argument("--job", default="", help="take the tracking URI from this job file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)


def _units(ref: str, args: argparse.Namespace, scratch: Path) -> dict[str, dict[str, Any]]:
    """Benchmark -> record type -> Units, from a folder or from MLflow."""
    import pyarrow.parquet as pq

    from owl.eval.evaluate import UNITS_DIR
    from owl.eval.uncertainty import units_from_rows

    folder = Path(ref) / UNITS_DIR
    if not Path(ref).is_dir():
        from pipelines import audit
        from pipelines.commands.run import tracking_uri_of

        folder = audit.download_evaluation(tracking_uri_of(args), ref, UNITS_DIR, scratch)
    elif not folder.is_dir():
        raise ValueError(f"{ref}: no {UNITS_DIR}/ folder: not an evaluate step's output")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ValueError(f"{ref}: no per-item scores in {folder}")
    return {f.stem: units_from_rows(pq.read_table(f).to_pylist()) for f in files}


def compare(a: dict, b: dict, num_resamples: int, seed: int) -> list[dict[str, Any]]:
    """One row per (benchmark, record type) both evaluations scored with the same metric."""
    from owl.eval.uncertainty import paired_difference

    rows = []
    for benchmark in sorted(set(a) & set(b)):
        for record_type in sorted(set(a[benchmark]) & set(b[benchmark])):
            ua, ub = a[benchmark][record_type], b[benchmark][record_type]
            if ua.metric != ub.metric:
                continue  # e.g. circular in one run, not in the other: not comparable
            result = paired_difference(ua, ub, num_resamples=num_resamples, seed=seed)
            rows.append({"benchmark": benchmark, "type": record_type, "metric": ua.metric,
                         **result})  # fmt: skip
    if not rows:
        raise ValueError("A and B share no benchmark scored with the same metric")
    return rows


def cmd_compare(args: argparse.Namespace) -> int:
    if args.resamples < 100:
        print("error: --resamples must be at least 100", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="owl-compare-") as scratch:
            a = _units(args.a, args, Path(scratch) / "a")
            b = _units(args.b, args, Path(scratch) / "b")
        rows = compare(a, b, args.resamples, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "comparisons": rows}, indent=2))
        return 0
    print(f"A = {args.a}\nB = {args.b}")
    print(f"{'benchmark':<20} {'metric':<20} {'A':>9} {'B':>9} {'A - B':>9} "
          f"{'95% interval':>21} {'p':>7} {'items':>7}")  # fmt: skip
    for r in rows:
        interval = f"[{r['low']:.4f}, {r['high']:.4f}]"
        print(f"{r['benchmark']:<20} {r['metric']:<20} {r['a']:9.4f} {r['b']:9.4f} "
              f"{r['difference']:+9.4f} {interval:>21} {r['p_value']:7.4f} {r['count']:7.0f}")  # fmt: skip
    return 0
