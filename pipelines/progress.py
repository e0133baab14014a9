"""Terminal progress for `owl run`: live per-step bars with rich on a TTY, plain lines otherwise
(or nothing on stdout with --json, where the summary is printed as JSON by the command).

What Ray, Ray Train, Ray Data, DeepSpeed and the steps print goes to `console.log` in the
execution's folder (`captured_output`); the terminal gets owl's own lines: a line (or live bar)
per step, training's step / loss / tokens per second / ETA, and a summary ending with the
registered model and where to look at it. `owl run --verbose` shows everything instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
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


# Shown first in the summary when a step reports them (evaluation's headline numbers), with the
# short label the summary gives them.
HEADLINE_METRICS = {
    "vqa.accuracy": "vqa",
    "vqa.blank_accuracy": "blank",
    "caption.CIDEr": "CIDEr",
    "multiple_choice.circular_accuracy": "mc",
    "text.accuracy": "text",
}
# Other steps: these first when present (training's outcome, a data step's counts), else the
# step's first metrics; never more than `limit` of them so a summary row stays on one line.
PREFERRED_METRICS = (
    "final_loss", "steps", "samples", "num_images", "num_out", "keep_rate", "samples_out"
)  # fmt: skip
# Plain (non-terminal) output: at most one progress line per step in this many seconds.
PLAIN_UPDATE_S = 30.0


def _number(value: float) -> str:
    """4 significant digits; whole numbers written out with thousands separators (18,000)."""
    if float(value).is_integer() and abs(value) < 1e12:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _key_metrics(metrics: dict[str, float], limit: int = 3, width: int = 52) -> str:
    """The few numbers worth a glance, as `label=value`: evaluation's headline metrics under
    short labels, else the preferred ones, else the first `limit`; no more than `width`
    characters (a summary row stays on one line at 120 columns) unless one pair is longer."""
    headline = [(label, metrics[k]) for k, label in HEADLINE_METRICS.items() if k in metrics]
    if headline:
        pairs = headline
    else:
        keys = [k for k in PREFERRED_METRICS if k in metrics] or list(metrics)
        pairs = [(k, metrics[k]) for k in keys[:limit]]
    text = ""
    for label, value in pairs:  # at least one; more while the row stays within `width`
        more = f"{', ' if text else ''}{label}={_number(value)}"
        if text and len(text) + len(more) > width:
            break
        text += more
    return text


def registered_line(registered: dict[str, str], alias: str) -> str:
    if not registered:
        return ""
    at = f" (@{alias})" if alias else " (alias not moved: not the job's final model)"
    return f"registered model {registered['name']} version {registered['version']}{at}"


class Reporter:
    """Plain-text reporter: one line per event, to `stream` (stderr keeps stdout for --json)."""

    def __init__(
        self, stream: TextIO | None = None, quiet: bool = False, update_s: float = PLAIN_UPDATE_S
    ):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.update_s = update_s
        self._last_update: dict[str, float] = {}

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line of information (where the logs go, a table), printed as is."""
        self._line(text)

    def start(self, step: str, note: str = "") -> None:
        """The step starts (no `note`), or a notice about it: a retry, a wait, a recompute."""
        self._line(f"[owl] {step}: {note or 'started'}")

    def update(self, step: str, done: float, total: float | None, message: str) -> None:
        now = time.monotonic()
        if now - self._last_update.get(step, 0.0) < self.update_s:
            return
        self._last_update[step] = now
        amount = f"{done:g}/{total:g}" if total else f"{done:g}"
        self._line(f"[owl] {step}: {amount} {message}".rstrip())

    def finish(self, step: str, state: str, duration_s: float, note: str = "") -> None:
        self._line(f"[owl] {step}: {state} in {duration_s:.1f}s {note}".rstrip())

    def close(
        self,
        summaries: list[StepSummary],
        registered: dict[str, str] | None = None,
        alias: str = "",
        look: list[str] | None = None,
    ) -> None:
        """The run's end: a row per step and how many came from cache, then the registered model
        and where to look at it (`look`)."""
        hits = sum(s.state == "cached" for s in summaries)
        self._summary(summaries, f"{hits}/{len(summaries)} steps from cache")
        if registered:
            self._end_line(registered_line(registered, alias))
        for line in look or []:
            self._end_line(line)

    def _summary(self, summaries: list[StepSummary], from_cache: str) -> None:
        for s in summaries:
            self._line(
                f"[owl] summary {s.step:<22} {s.state:<11} {s.duration_s:8.1f}s {s.key[:12]} "
                f"{_key_metrics(s.metrics)}".rstrip()
            )
        self._line(f"[owl] {from_cache}")

    def _end_line(self, text: str) -> None:
        self._line(f"[owl] {text}")


class RichReporter(Reporter):
    """Live bars, one per step, and a summary table at the end."""

    def __init__(self, console: Console | None = None):
        super().__init__()
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.fields[step]:<22}"),
            BarColumn(bar_width=24),  # room at 120 columns for "loss ..., tok/s, ETA ..." in full
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,  # the summary table replaces the bars when the run ends
            # Not Rich's default: its bars would take sys.stdout / sys.stderr over and show
            # what Ray, img2dataset and logging print there (that goes to console.log).
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def note(self, text: str) -> None:
        # soft_wrap: the terminal wraps a long line (a path) instead of Rich cutting it in two.
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def start(self, step: str, note: str = "") -> None:
        if not self.tasks:
            self.bars.start()
        if step in self.tasks:  # a retry or a notice: same bar, new status
            self.bars.update(self.tasks[step], status=note or "running")
            return
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

    def _summary(self, summaries: list[StepSummary], from_cache: str) -> None:
        if self.tasks:
            self.bars.stop()
        table = Table(title="owl run")
        table.add_column("step", no_wrap=True)
        table.add_column("state", no_wrap=True, min_width=11)
        table.add_column("time", no_wrap=True, justify="right")
        table.add_column("key", no_wrap=True)
        table.add_column("metrics", overflow="fold")
        for s in summaries:
            table.add_row(
                s.step, s.state, f"{s.duration_s:.1f}s", s.key[:12], _key_metrics(s.metrics)
            )
        table.caption = from_cache
        self.console.print(table)

    def _end_line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


def make_reporter(json_mode: bool = False, stream: TextIO | None = None) -> Reporter:
    """The reporter for `owl run`: quiet with --json, live bars on a terminal, plain lines (no
    ANSI codes) otherwise. `stream` is where owl's own lines go (default stderr)."""
    stream = stream or sys.stderr
    if json_mode:
        return Reporter(stream, quiet=True)
    if stream.isatty() and os.environ.get("TERM") != "dumb":
        return RichReporter(Console(file=stream))
    return Reporter(stream)


@contextlib.contextmanager
def captured_output(log_path: Path) -> Iterator[TextIO]:
    """Send file descriptors 1 and 2 (this process, its threads, and the subprocesses and Ray
    log streams it starts) to `log_path`; yield a stream on the original stderr for owl's own
    lines. Restored on exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log = os.fdopen(os.dup(log_fd), "w", buffering=1)  # for sys.stdout / sys.stderr objects
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield terminal
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()
        # `log` stays open: logging handlers made meanwhile (Ray's, on import) hold it as their
        # stream and write at exit too; closed, each such line was a "ValueError: I/O operation
        # on closed file" traceback on the terminal.
        log.flush()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def training_message(metrics: dict[str, float], total_steps: int | None) -> str:
    """`loss 2.3140, 1,234 tok/s, ETA 3m05s` from the metrics a training worker reports."""
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    step = metrics.get("step")
    if total_steps and step is not None and metrics.get("step_time_s"):
        parts.append(f"ETA {format_eta((total_steps - step) * metrics['step_time_s'])}")
    return ", ".join(parts)
