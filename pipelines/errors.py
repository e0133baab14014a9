"""User errors: what the `owl` command prints as one `error: ...` line instead of a traceback.

`UserError` is raised where owl knows the user has to fix something (an address, a credential,
a path); the CLI also treats the standard exceptions in `USER_ERRORS` that way. `OWL_DEBUG=1`
shows the traceback anyway.
"""

from __future__ import annotations

import json


class UserError(Exception):
    """Something the user has to fix; its message says what."""


# Bad values, missing files, unreachable services: the message is for the user, not a bug report.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ConnectionError,
    json.JSONDecodeError,
)


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """The exception's message as one line: its lines joined with "; ", cut at `limit`."""
    text = str(exc).strip()
    if isinstance(exc, KeyError | FileNotFoundError) and exc.args and len(exc.args) == 1:
        text = str(exc.args[0])
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def root_cause(exc: BaseException) -> BaseException:
    """The exception that started it: through Ray Train's worker failures (the lowest rank's)
    and controller failure, a Ray task error's `cause`, and `raise ... from`."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
            continue
        inner = (
            getattr(exc, "controller_failure", None) or getattr(exc, "cause", None) or exc.__cause__
        )
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """One line that leads with the cause: `Outer <- Cause: message`, the message's indented
    detail lines (Ray's actor ids, pids, addresses) left out, cut at a word within `limit`."""
    cause = root_cause(exc)
    lines = str(cause).splitlines()
    kept = [line for line in lines if line.strip() and not line[:1].isspace()] or lines
    message = " ".join(" ".join(kept).split())
    text = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    if cause is not exc:
        text = f"{type(exc).__name__} <- {text}"
    if len(text) <= limit:
        return text
    return text[: limit - 2].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
