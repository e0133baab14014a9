"""Pipeline commands: `owl run`, `owl status`, `owl audit`, `owl submit`, `owl logs`, `owl stop`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.cache import canonical_json
from pipelines.errors import UserError
from pipelines.jobspec import JobSpec, load_job, to_yaml
from pipelines.progress import captured_output, make_reporter

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never shipped to the cluster with `owl submit`: environments, data, outputs, caches.
# Gitignore patterns: the project's own data/output folders are anchored at its root ("/data"),
# an unanchored "data" would also drop the `owl/data` package (tests/integration/multinode.py:
# nodes without the project's sources import only what was shipped).
SUBMIT_EXCLUDES = [
    ".venv", ".venv-*", ".git", "/data", "/outputs", "/runs", ".owl", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache", ".whl", ".gl", "build", "dist",
]  # fmt: skip
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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
        help="override a job field, value parsed as YAML (repeatable): --set stage1.max_steps=10",
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


def _tracking_uri(args: argparse.Namespace) -> str:
    if args.mlflow_uri:
        return args.mlflow_uri
    if args.job:
        return load_job(args.job, args.overrides).mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise ValueError(
        "no MLflow tracking URI: pass --mlflow-uri, --job JOB or set MLFLOW_TRACKING_URI"
    )


def cmd_audit(args: argparse.Namespace) -> int:
    from pipelines import lineage

    try:
        uri = _tracking_uri(args)
        if args.audit_kind == "model":
            report = lineage.audit_model(uri, args.ref)
        else:
            report = lineage.audit_dataset(uri, args.digest)
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
# owl submit / logs / stop (Ray Job Submission SDK; the token comes from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, which the SDK reads itself)


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


def _client(address: str) -> Any:
    """A JobSubmissionClient for `address`, with Ray's failures turned into one-line errors."""
    if not address:
        raise UserError(
            "no Ray address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
        )
    _enable_token_auth_if_configured()
    from ray.job_submission import JobSubmissionClient

    with ray_errors(address):
        return JobSubmissionClient(address)


def _token_source() -> str:
    """Where the Ray client would read a token from ("" if there is none)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).expanduser().is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: no such file (the cluster's token)")
        return path
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else ""


def _enable_token_auth_if_configured() -> None:
    """Ray's client sends its token only with RAY_AUTH_MODE=token; a user who set up a token
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) means to use it."""
    source = _token_source()  # a RAY_AUTH_TOKEN_PATH that names no file: said here
    if "RAY_AUTH_MODE" not in os.environ and source:
        os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def ray_errors(address: str, submission_id: str = "") -> Iterator[None]:
    """Ray Job Submission failures as one-line user errors that say what to check."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        source = _token_source() or "none found"
        if "403" in exc.message or "invalid" in exc.message.lower():
            raise UserError(
                f"the Ray cluster at {address} rejected the token (from {source}): use the "
                "cluster's RAY_AUTH_TOKEN (infra/README.md, Ray token authentication)"
            ) from None
        raise UserError(
            f"the Ray cluster at {address} requires a token and none was sent: set "
            "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it (infra/README.md)"
        ) from None
    except requests.exceptions.InvalidJSONError as exc:  # something else answers there
        raise UserError(
            f"{address} answered, but not as a Ray dashboard does ({_first_line(exc)}): is this "
            "the cluster's dashboard address (http://HEAD:8265)?"
        ) from None
    # The client turns a refused first request into the builtin ConnectionError; a dashboard
    # lost later (between list and submit, while --wait polls) raises requests' own errors.
    except (ConnectionError, requests.exceptions.RequestException) as exc:
        raise UserError(
            f"cannot reach the Ray dashboard at {address} ({_first_line(exc)}): is the cluster "
            "up, and is this its dashboard address (http://HEAD:8265)?"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if submission_id and ("404" in text or "does not exist" in text):
            raise UserError(f"no job {submission_id} on the Ray cluster at {address}") from None
        raise UserError(f"the Ray cluster at {address}: {_first_line(exc)}") from None
    except ValueError as exc:  # e.g. an address Ray cannot parse
        raise UserError(f"--address {address}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def submission_base_id(raw: dict[str, Any]) -> str:
    """Deterministic id from the job after overrides: the same job maps to the same submission."""
    digest = hashlib.sha256(canonical_json(raw).encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(raw.get("name", "job")))
    return f"owl-{name}-{digest}"


def submit_job(
    job: JobSpec, address: str, python: str = "python", working_dir: Path | None = None
) -> tuple[str, str]:
    """(submission id, "submitted" | "attached"): a job with the same id that is still pending or
    running is attached to; after a finished one the next free `-rN` id is used."""
    from pipelines.lineage import git_commit

    client = _client(address)
    raw = {**job.raw, "storage": str(job.storage)}
    base = submission_base_id(raw)
    with ray_errors(address):
        known = {j.submission_id: str(j.status) for j in client.list_jobs() if j.submission_id}
    attempt = 1
    while True:
        sid = base if attempt == 1 else f"{base}-r{attempt}"
        status = known.get(sid)
        if status is None:
            break
        if status.split(".")[-1] not in _TERMINAL:
            return sid, "attached"
        attempt += 1
    env_vars = {
        "OWL_JOB_YAML": to_yaml(raw),
        "OWL_SUBMISSION_ID": sid,
        "OWL_GIT_COMMIT": git_commit(),
    }
    if os.environ.get("OWL_STEPS_TABLE"):  # a custom step table travels with the job
        env_vars["OWL_STEPS_TABLE"] = os.environ["OWL_STEPS_TABLE"]
    runtime_env = {**code_runtime_env(job.storage, working_dir), "env_vars": env_vars}
    with ray_errors(address):
        client.submit_job(
            entrypoint=f"{python} -m pipelines.cli run env:OWL_JOB_YAML",
            submission_id=sid,
            runtime_env=runtime_env,
            metadata={"owl.job": job.name},
        )
    return sid, "submitted"


def is_source_checkout(root: Path) -> bool:
    """True for the project's own folder (a clone or an editable install), False for an installed
    package, whose parent folder is site-packages."""
    pyproject = root / "pyproject.toml"
    return pyproject.is_file() and 'name = "owl"' in pyproject.read_text()


def code_runtime_env(storage: Path, working_dir: Path | None = None) -> dict[str, Any]:
    """What carries owl's code to the cluster: the project folder as the working_dir from a
    checkout; from an installed (non-editable) package only the `owl` and `pipelines` packages
    as py_modules, never the site-packages folder they sit in."""
    root = working_dir or PROJECT_ROOT
    if working_dir is not None or is_source_checkout(root):
        return {
            "working_dir": str(root),
            "excludes": SUBMIT_EXCLUDES + _storage_exclude(storage, root),
        }
    import owl
    import pipelines

    return {
        "py_modules": [str(Path(m.__file__).resolve().parent) for m in (owl, pipelines)],
        "excludes": ["__pycache__"],
    }


def _storage_exclude(storage: Path, working_dir: Path) -> list[str]:
    try:
        return ["/" + str(storage.relative_to(working_dir.resolve()))]
    except ValueError:
        return []


@contextlib.contextmanager
def _ray_client_quiet() -> Iterator[None]:
    """The Ray job client logs how it packages and uploads the code (INFO, and WARNING for a
    large file): `owl submit` prints its own lines only; failures still raise. Its loggers set
    their own levels (dashboard_sdk: INFO), so each `ray.*` logger is quietened, then restored."""
    import logging

    _enable_token_auth_if_configured()  # before Ray is imported: it reads RAY_AUTH_MODE then
    import ray.job_submission  # noqa: F401  (creates the client's loggers)

    loggers = [logging.getLogger("ray")] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
        if name.startswith("ray.")
    ]  # fmt: skip
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def job_state(address: str, submission_id: str, client: Any = None) -> str:
    """The submission's state now: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client = client or _client(address)
    with ray_errors(address, submission_id):
        return str(client.get_job_status(submission_id)).split(".")[-1]


def wait_for(address: str, submission_id: str, poll_s: float = 2.0) -> str:
    client = _client(address)
    while True:
        status = job_state(address, submission_id, client)
        if status in _TERMINAL:
            return status
        time.sleep(poll_s)


def cmd_submit(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.overrides)
    with _ray_client_quiet():
        sid, how = submit_job(job, args.address, args.python)
        status = wait_for(args.address, sid) if args.wait else job_state(args.address, sid)
    if args.json:
        _print_json({"submission_id": sid, "action": how, "status": status})
    else:
        print(f"{how} {sid}" + (f": {status}" if args.wait else ""))
        print(f"follow: owl logs {sid} --address {args.address} --follow")
    return 1 if args.wait and status in ("FAILED", "STOPPED") else 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args.address)
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
    client = _client(args.address)
    with ray_errors(args.address, args.submission_id):
        stopped = client.stop_job(args.submission_id)
    if args.json:
        _print_json({"submission_id": args.submission_id, "stopped": bool(stopped)})
    else:
        print(("stopping " if stopped else "already finished: ") + args.submission_id)
    return 0
