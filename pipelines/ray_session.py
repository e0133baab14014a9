"""The Ray cluster of one `owl run`: connected to (or started) only when a step that uses Ray
computes, so a fully cached re-run never starts Ray. A local cluster of our own gets a watcher
(pipelines/reaper.py) so that its helpers do not outlive a killed `owl run`, and is shut down with
the run."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path


class RaySession:
    """`ensure()` before a step that uses Ray computes, `shutdown()` once the run ends. `address`
    is the job's `ray_address` ("" starts a local cluster unless RAY_ADDRESS is set);
    `after_init` runs once Ray is up (the runner puts back its signal handlers)."""

    def __init__(self, address: str, after_init: Callable[[], None]):
        self.address = address
        self.after_init = after_init
        self._started_ray = False
        self._reaper: subprocess.Popen | None = None  # see pipelines/reaper.py

    def ensure(self) -> None:
        import ray  # imported only when a step computes: a cached re-run does not start Ray

        if not ray.is_initialized():
            context = ray.init(address=self.address or None, log_to_driver=True)
            self._started_ray = True
            if not self.address and not os.environ.get("RAY_ADDRESS"):
                # A local cluster of our own: its helpers must not outlive a killed `owl run`.
                from pipelines import reaper

                self._reaper = reaper.start(context.address_info["session_dir"])
            self.after_init()  # ray.init replaced the SIGTERM handler with sys.exit
            _private_token_file()

    def shutdown(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
        if self._reaper is not None:
            self._reaper.terminate()
            self._reaper.wait()
            self._reaper = None


def _private_token_file() -> None:
    """Ray writes the token of a cluster it starts to ~/.ray/auth_token readable by everyone on
    the machine; only its owner should read it."""
    path = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        if path.is_file() and path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
