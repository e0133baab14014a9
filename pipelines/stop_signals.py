"""SIGTERM (`owl stop`, `ray job stop`, `kill`) and SIGINT (Ctrl-C) during `owl run`: the runner's
handler closes its records first, then unwinds (pipelines.runner, `Runner.interrupt`). Handlers
are only set from the main thread (Python refuses them elsewhere): a runner started in another
thread leaves the process's handlers alone."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

Handler = Callable[[int, Any], None]


@contextlib.contextmanager
def handled(handler: Handler) -> Iterator[None]:
    """`handler` for SIGTERM and SIGINT while inside, the previous handlers again after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install(handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def install(handler: Handler) -> None:
    """Set `handler` for SIGTERM and SIGINT (again: `ray.init` replaces the SIGTERM handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def reason(signum: int) -> str:
    """What a record says stopped the run, e.g. `SIGTERM: stopped (owl stop, ray job stop or
    kill)`."""
    how = "stopped (owl stop, ray job stop or kill)" if signum == signal.SIGTERM else "Ctrl-C"
    return f"{signal.Signals(signum).name}: {how}"
