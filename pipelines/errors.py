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
