"""What happened to a training stage's workers, for the driver and MLflow: a Ray Train callback
(it runs in the controller) appends an event to a JSON file each time the workers fail (a worker
raised, or its node died) and when training reports again afterwards ("recovered", with the times
rank 0 of the new workers got ready: `owl.train.loop.STARTUP_TIMES`); the driver shows each new
event as a progress line and puts them in the stage's manifest (`info.train_events` and the stats
`worker_failures` / `recovery_s`, which the runner logs to the stage's MLflow run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.step import StepContext


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def failure_callback(path: Path) -> Any:
    """The Ray Train callback that writes the events to `path`."""
    from ray.train import UserCallback

    from pipelines.cache import write_json_atomic

    class FailureEvents(UserCallback):
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []
            self.step = 0.0

        def _add(self, event: str, **fields: Any) -> None:
            self.events.append({"event": event, "time": time.time(), "step": self.step, **fields})
            write_json_atomic(path, {"events": self.events})

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if metrics and metrics[0]:
                self.step = float(metrics[0].get("step", self.step))
                if self.events and self.events[-1]["event"] == "failure":
                    ready = {k: float(metrics[0][k]) for k in STARTUP_LABELS if k in metrics[0]}
                    self._add("recovered", startup=ready)

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Any]) -> None:
            ranks = sorted(worker_exceptions)
            self._add("failure", ranks=ranks, error=_first_line(worker_exceptions[ranks[0]]))

    return FailureEvents()


# owl.train.loop.STARTUP_TIMES (not imported: this module runs without torch), as the line says them.
STARTUP_LABELS = {
    "worker_start": "training function",
    "engine_ready": "DeepSpeed engine",
    "restored": "checkpoint restored",
}


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text())["events"])
    except (OSError, ValueError, KeyError):
        return []


def describe(event: dict[str, Any], events: list[dict[str, Any]], max_failures: int) -> str:
    """One progress line for `event` (one of `events`)."""
    if event["event"] == "failure":
        return (
            f"workers failed after step {event['step']:g} (ranks {event['ranks']}: "
            f"{event['error']}); Ray Train restarts them from the last checkpoint when the "
            f"cluster has their resources (failure {_count(events, event)} of {max_failures} "
            "allowed)"
        )
    failure = _failure_before(events, event)
    if not failure:
        return f"recovered: training again at step {event['step']:g}"
    ready = event.get("startup", {})
    split = ", ".join(
        f"{label} +{ready[name] - failure['time']:.0f}s"
        for name, label in STARTUP_LABELS.items()
        if name in ready
    )
    return (
        f"recovered: training again at step {event['step']:g}, "
        f"{event['time'] - failure['time']:.0f}s after the failure"
        + (f" ({split})" if split else "")
    )


def show_new(ctx: StepContext, path: Path, shown: int, max_failures: int) -> int:
    """Show the events after the first `shown` (a line in the log and the progress); the count."""
    events = read_events(path)
    for event in events[shown:]:
        message = describe(event, events, max_failures)
        print(f"{ctx.step}: {message}", flush=True)
        ctx.progress(event["step"], None, message)
    return max(shown, len(events))


def summarize(events: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
    """(stats, info) for the manifest; both empty when nothing failed."""
    failures = [e for e in events if e["event"] == "failure"]
    if not failures:
        return {}, {}
    recoveries = [
        e["time"] - f["time"]
        for e in events
        if e["event"] == "recovered" and (f := _failure_before(events, e))
    ]
    stats = {"worker_failures": float(len(failures))}
    if recoveries:
        stats["recovery_s"] = max(recoveries)
    return stats, {"train_events": events}


def _count(events: list[dict[str, Any]], event: dict[str, Any]) -> int:
    failures = [e for e in events if e["event"] == "failure"]
    return failures.index(event) + 1


def _failure_before(events: list[dict[str, Any]], event: dict[str, Any]) -> dict[str, Any] | None:
    """The first failure after the previous recovery: the one `event` recovered from."""
    first = None
    for e in events[: events.index(event)]:
        if e["event"] == "recovered":
            first = None
        elif first is None:
            first = e
    return first
