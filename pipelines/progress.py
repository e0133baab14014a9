"""Terminal progress for `owl run`: live per-step bars with rich on a TTY, plain lines otherwise
(or nothing on stdout with --json, where the summary is printed as JSON by the command)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass
class StepSummary:
    step: str
    state: str
    duration_s: float
    key: str
    metrics: dict[str, float] = field(default_factory=dict)


# Shown first in the summary when a step reports them (evaluation's headline numbers).
HEADLINE_METRICS = (
    "vqa.accuracy",
    "vqa.blank_accuracy",
    "caption.CIDEr",
    "multiple_choice.circular_accuracy",
    "text.accuracy",
)


def _key_metrics(metrics: dict[str, float], limit: int = 4) -> str:
    headline = [k for k in HEADLINE_METRICS if k in metrics]
    keys = headline or list(metrics)[:limit]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys)


class Reporter:
    """Plain-text reporter: one line per event, to `stream` (stderr keeps stdout for --json)."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._last_update: dict[str, float] = {}

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def start(self, step: str, note: str = "") -> None:
        self._line(f"[owl] {step}: started {note}".rstrip())

    def update(self, step: str, done: float, total: float | None, message: str) -> None:
        now = time.monotonic()
        if now - self._last_update.get(step, 0.0) < 5.0:  # plain logs: at most one line per 5 s
            return
        self._last_update[step] = now
        amount = f"{done:g}/{total:g}" if total else f"{done:g}"
        self._line(f"[owl] {step}: {amount} {message}".rstrip())

    def finish(self, step: str, state: str, duration_s: float, note: str = "") -> None:
        self._line(f"[owl] {step}: {state} in {duration_s:.1f}s {note}".rstrip())

    def close(self, summaries: list[StepSummary]) -> None:
        for s in summaries:
            self._line(
                f"[owl] summary {s.step:<22} {s.state:<8} {s.duration_s:8.1f}s {s.key[:12]} "
                f"{_key_metrics(s.metrics)}".rstrip()
            )


class RichReporter(Reporter):
    """Live bars, one per step, and a summary table at the end."""

    def __init__(self, console: Console | None = None):
        super().__init__()
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.fields[step]:<22}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.tasks: dict[str, TaskID] = {}

    def start(self, step: str, note: str = "") -> None:
        if not self.tasks:
            self.bars.start()
        self.tasks[step] = self.bars.add_task(step, total=None, step=step, status=note or "running")

    def update(self, step: str, done: float, total: float | None, message: str) -> None:
        if step in self.tasks:
            self.bars.update(self.tasks[step], completed=done, total=total, status=message)

    def finish(self, step: str, state: str, duration_s: float, note: str = "") -> None:
        if step not in self.tasks:
            self.start(step)
        task = self.tasks[step]
        self.bars.update(task, total=1, completed=1, status=f"{state} {note}".strip())
        self.bars.stop_task(task)

    def close(self, summaries: list[StepSummary]) -> None:
        if self.tasks:
            self.bars.stop()
        table = Table(title="owl run")
        for column in ("step", "state", "time", "key", "metrics"):
            table.add_column(column)
        for s in summaries:
            table.add_row(
                s.step, s.state, f"{s.duration_s:.1f}s", s.key[:12], _key_metrics(s.metrics)
            )
        hits = sum(s.state == "cached" for s in summaries)
        table.caption = f"{hits}/{len(summaries)} steps from cache"
        self.console.print(table)


def make_reporter(json_mode: bool = False) -> Reporter:
    if json_mode:
        return Reporter(quiet=True)
    if sys.stderr.isatty():
        return RichReporter()
    return Reporter()
