"""The Ray Job Submission client behind `owl submit`, `owl logs` and `owl stop`: a job's
deterministic submission id, submitting it with owl's code (the project folder from a checkout,
the `owl` and `pipelines` packages from an installed package), its state, and Ray's failures as
one-line user errors. The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, which the SDK reads itself."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.cache import canonical_json
from pipelines.errors import UserError
from pipelines.jobspec import JobSpec, to_yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never shipped to the cluster with `owl submit`: environments, data, outputs, caches.
# Gitignore patterns: the project's own data/output folders are anchored at its root ("/data"),
# an unanchored "data" would also drop the `owl/data` package (tests/integration/multinode.py:
# nodes without the project's sources import only what was shipped).
SUBMIT_EXCLUDES = [
    ".venv", ".venv-*", ".git", "/data", "/outputs", "/runs", ".owl", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache", ".whl", ".gl", "build", "dist",
]  # fmt: skip
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def jobs_client(address: str) -> Any:
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

    client = jobs_client(address)
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
        if status.split(".")[-1] not in TERMINAL:
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
def ray_client_quiet() -> Iterator[None]:
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
    client = client or jobs_client(address)
    with ray_errors(address, submission_id):
        return str(client.get_job_status(submission_id)).split(".")[-1]


def wait_for(address: str, submission_id: str, poll_s: float = 2.0) -> str:
    client = jobs_client(address)
    while True:
        status = job_state(address, submission_id, client)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
