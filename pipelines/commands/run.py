"""Pipeline commands: `owl run`, `owl status`, `owl audit`, `owl submit`, `owl logs`, `owl stop`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.jobspec import JobSpec, load_job, resolve_tracking_uri
from pipelines.progress import captured_output, make_reporter
from pipelines.ray_jobs import (
    job_state,
    jobs_client,
    ray_client_quiet,
    ray_errors,
    submit_job,
    wait_for,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_run(subparsers)
    _add_status(subparsers)
    _add_audit(subparsers)
    _add_submit(subparsers)
    _add_job_ops(subparsers)


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file (YAML), or env:VAR for YAML text in a variable")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a job field, value parsed as YAML (repeatable): --set stage1.schedule.max_steps=10",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# owl run


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a job: cached steps are reused, the rest computed")
    _job_args(p)
    p.add_argument("--force", action="append", default=[], metavar="STEP",
                   help="re-run STEP and everything downstream (repeatable)")  # fmt: skip
    p.add_argument("--until", metavar="STEP", help="stop after STEP (runs only what it needs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument(
        "--verify", action="store_true", help="check cached files' sha256, not only sizes"
    )
    p.add_argument(
        "--verbose", action="store_true", help="show Ray's, DeepSpeed's and the steps' own output "
        "on the terminal (default: console.log in the execution's folder)",
    )  # fmt: skip
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.plan import check_environment, check_inputs, forced_steps, plan, select_steps
    from pipelines.runner import Runner

    try:
        job = load_job(args.job, args.overrides)
        if args.dry_run:
            planned = [p.to_dict() for p in plan(job, args.force, args.until)]
            _show_plan(job, planned, args.json)
            return 0
        forced_steps(job, args.force)  # bad --force / --until: before any log
        names = select_steps(job, args.until)
        check_environment(job, names)  # e.g. Java for caption benchmarks
        check_inputs(job, names)  # before Ray starts
    except ValueError as exc:
        return _fail(str(exc))
    signal.signal(signal.SIGTERM, _raise_interrupt)  # until the runner installs its own
    runner = Runner(job)
    log_path = job.storage / "executions" / runner.execution.execution_id / "console.log"
    if args.verbose:
        with _stdout_to_stderr() if args.json else contextlib.nullcontext():
            runner.reporter = make_reporter(args.json)
            result = runner.run(args.force, args.until, args.verify)
    else:
        with captured_output(log_path) as terminal:
            runner.reporter = make_reporter(args.json, terminal)
            runner.reporter.note(
                f"[owl] {job.name}: execution {runner.execution.execution_id}; Ray, DeepSpeed "
                f"and step logs go to {log_path} (--verbose shows them)"
            )
            result = runner.run(args.force, args.until, args.verify)
    if args.json:
        _print_json(result.to_dict())
    elif not result.ok:
        print(f"error: {result.error}", file=sys.stderr)
        if not args.verbose:
            print(f"the step's full output: {log_path}", file=sys.stderr)
    return 0 if result.ok else 1


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """With --json, stdout carries only the result: what steps, Ray workers or subprocesses
    print meanwhile goes to stderr (at the file-descriptor level, so subprocesses follow)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _show_plan(job: JobSpec, planned: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _print_json({"job": job.name, "storage": str(job.storage), "steps": planned})
        return
    table = Table(title=f"plan: {job.name} -> {job.storage}")
    for column in ("step", "key", "cached", "resources", "GPU memory/worker"):
        table.add_column(column)
    for p in planned:
        res = p["resources"]
        memory = f"{p['memory_gib']:.2f} GiB" if p["memory_gib"] is not None else ""
        state = "forced" if p["forced"] else ("yes" if p["cached"] else "no")
        resources = (
            f"{res['num_workers']}x({res['cpus_per_worker']:g} CPU, {res['gpus_per_worker']:g} GPU)"
        )
        table.add_row(p["name"], (p["key"] or "after inputs")[:12], state, resources, memory)
    console = Console()
    console.print(table)
    for p in planned:
        for problem in p.get("problems", []):
            console.print(f"warning: {p['name']}: {problem} (it will be recomputed)")


# ---------------------------------------------------------------------------------------------
# owl status


def _add_status(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="per step: state, duration, key, MLflow run id")
    _job_args(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.status import job_status

    try:
        status = job_status(load_job(args.job, args.overrides))
    except ValueError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json(status)
        return 0
    table = Table(title=f"{status['job']} ({status['storage']})")
    for column in ("step", "state", "time", "key"):  # never cut: the words a user reads
        table.add_column(column, no_wrap=True, min_width=11 if column == "state" else None)
    table.add_column("MLflow run", overflow="fold")
    for s in status["steps"]:
        table.add_row(
            s["step"], s["state"], f"{s['duration_s']:.1f}s", s["key"][:12], s["mlflow_run_id"]
        )
    console = Console(soft_wrap=True, highlight=False)
    console.print(table)
    console.print(f"MLflow: {status['mlflow_uri']} ({status['mlflow_uri_from']})")
    for s in status["steps"]:
        if s["mixture"]:
            total = sum(s["mixture"].values())
            parts = [f"{name} {w:g} ({w / total:.0%})" for name, w in s["mixture"].items()]
            line = f"mixture {s['step']}: {', '.join(parts)}"
            if s["drawn"]:
                drawn = sum(s["drawn"].values()) or 1
                parts = [f"{name} {n:,} ({n / drawn:.0%})" for name, n in s["drawn"].items()]
                line += f"; samples drawn: {', '.join(parts)}"
            console.print(line)
    for s in status["steps"]:
        for problem in s.get("problems", []):
            console.print(f"warning: {s['step']}: {problem} (the next `owl run` recomputes it)")
    if status["registered_model"]:
        console.print(f"registered_model: {status['registered_model']}")
    if status["metrics"]:
        console.print("metrics:")
        for line in metric_lines(status["metrics"]):
            console.print(f"  {line}")
    return 0


CI_LOW, CI_HIGH = "_ci95_low", "_ci95_high"


def metric_lines(metrics: dict[str, float]) -> list[str]:
    """One line per metric, a headline metric with its bootstrap interval beside it:
    "vqa.accuracy 0.872 [95%: 0.84, 0.9]" (the interval keys are not listed on their own)."""
    lines = []
    for name, value in sorted(metrics.items()):
        if name.endswith((CI_LOW, CI_HIGH)):
            continue
        line = f"{name} {value:.4g}"
        if name + CI_LOW in metrics and name + CI_HIGH in metrics:
            line += f" [95%: {metrics[name + CI_LOW]:.4g}, {metrics[name + CI_HIGH]:.4g}]"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# owl audit


def _add_audit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="trace a model or dataset through MLflow lineage")
    kinds = p.add_subparsers(dest="audit_kind", metavar="KIND")
    for kind, arg, helptext in (
        ("model", "ref", "NAME, NAME@alias or NAME/version: the chain back to the URL lists"),
        ("dataset", "digest", "a manifest digest (>= 8 chars): its producer and consumers"),
    ):
        sub = kinds.add_parser(kind, help=helptext)
        sub.add_argument(arg)
        sub.add_argument("--mlflow-uri", default="", help="tracking URI (default: from --job, "
                         "else MLFLOW_TRACKING_URI)")  # fmt: skip
        sub.add_argument("--job", default="", help="take the tracking URI from this job file")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE"
        )
        sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=cmd_audit)


def tracking_uri_of(args: argparse.Namespace) -> str:
    """The tracking URI a reading command (audit, compare) uses: --mlflow-uri, else its --job's
    (pipelines.jobspec.resolve_tracking_uri), else MLFLOW_TRACKING_URI."""
    if args.mlflow_uri:
        return args.mlflow_uri
    if args.job:
        return load_job(args.job, args.overrides).mlflow_uri
    uri, _ = resolve_tracking_uri("", None)
    if not uri:
        raise ValueError(
            "no MLflow tracking URI: pass --mlflow-uri, --job JOB or set MLFLOW_TRACKING_URI"
        )
    return uri


def cmd_audit(args: argparse.Namespace) -> int:
    from pipelines import audit

    try:
        uri = tracking_uri_of(args)
        if args.audit_kind == "model":
            report = audit.audit_model(uri, args.ref)
        else:
            report = audit.audit_dataset(uri, args.digest)
    except ValueError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json(report)
    elif args.audit_kind == "model":
        _show_model_audit(report)
    else:
        _show_dataset_audit(report)
    return 0


def _show_model_audit(report: dict[str, Any]) -> None:
    model = report["model"]
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"model {model['name']} version {model['version']}")
    for entry in report["chain"]:
        counts = ", ".join(f"{k}={v:g}" for k, v in entry["counts"].items())
        console.print(
            f"  {entry['step']:<22} run {entry['run_id']} out {entry['output_digest'][:16]} {counts}"
        )
        for i in entry["inputs"]:
            source = f"folder {i['path']}" if i.get("path") else f"run {i['producer_run_id']}"
            console.print(f"      <- {i['role']}: {i['step']} {i['digest'][:16]} ({source})")
        for k, v in entry.get("params", {}).items():
            console.print(f"      {k} = {v}")


def _show_dataset_audit(report: dict[str, Any]) -> None:
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"dataset {report['digest']}")
    for p in report["producers"]:
        console.print(f"  produced by {p['step']} run {p['run_id']} ({p['cache']})")
    for c in report["consumers"]:
        console.print(f"  read by     {c['step']} run {c['run_id']} ({c['cache']})")


# ---------------------------------------------------------------------------------------------
# owl submit / logs / stop (the Ray Job Submission client: pipelines.ray_jobs)


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", ""),
        help="Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )  # fmt: skip


def _add_submit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="run a job on a Ray cluster (Ray Job Submission)")
    _job_args(p)
    _address_arg(p)
    p.add_argument("--python", default="python", help="python on the cluster nodes")
    p.add_argument(
        "--wait", action="store_true", help="follow until the job ends; exit 1 if it fails"
    )
    p.set_defaults(func=cmd_submit)


def _add_job_ops(subparsers: argparse._SubParsersAction) -> None:
    logs = subparsers.add_parser("logs", help="print the driver logs of a submitted job")
    logs.add_argument("submission_id")
    _address_arg(logs)
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--json", action="store_true")
    logs.set_defaults(func=cmd_logs)
    stop = subparsers.add_parser("stop", help="stop a submitted job")
    stop.add_argument("submission_id")
    _address_arg(stop)
    stop.add_argument("--json", action="store_true")
    stop.set_defaults(func=cmd_stop)


def cmd_submit(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.overrides)
    with ray_client_quiet():
        sid, how = submit_job(job, args.address, args.python)
        status = wait_for(args.address, sid) if args.wait else job_state(args.address, sid)
    if args.json:
        _print_json({"submission_id": sid, "action": how, "status": status})
    else:
        print(f"{how} {sid}" + (f": {status}" if args.wait else ""))
        print(f"follow: owl logs {sid} --address {args.address} --follow")
    return 1 if args.wait and status in ("FAILED", "STOPPED") else 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = jobs_client(args.address)
    with ray_errors(args.address, args.submission_id):
        if args.follow and not args.json:
            client.get_job_status(args.submission_id)  # an unknown id: one line, not a traceback
            asyncio.run(_tail(client, args.submission_id))
            return 0
        logs = client.get_job_logs(args.submission_id)
    if args.json:
        _print_json({"submission_id": args.submission_id, "logs": logs})
    else:
        print(logs, end="")
    return 0


async def _tail(client: Any, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


def cmd_stop(args: argparse.Namespace) -> int:
    client = jobs_client(args.address)
    with ray_errors(args.address, args.submission_id):
        stopped = client.stop_job(args.submission_id)
    if args.json:
        _print_json({"submission_id": args.submission_id, "stopped": bool(stopped)})
    else:
        print(("stopping " if stopped else "already finished: ") + args.submission_id)
    return 0
