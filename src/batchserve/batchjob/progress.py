"""How a batch job reports: a progress bar on a terminal (rich: lines done / total, rate, ETA,
errors), a plain line every few seconds when stderr is not a terminal, and a summary at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class Counts:
    """A job's lines: to run (this run), done before (earlier runs), answered and errors (this run)."""

    total: int
    before: int = 0
    answered: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.answered + self.errors

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        """One plain progress line."""
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        eta = f", ETA {duration((self.total - self.done) / self.rate)}" if self.rate > 0 and self.done < self.total else ""
        return f"run-batch: {self.done}/{self.total} lines{share}, {self.rate:.1f} lines/s{eta}, {self.errors} errors"


class Progress:
    """Reports :class:`Counts` while a job runs: ``bar`` (a terminal), plain lines every
    ``every`` seconds (:meth:`tick`, called by the job's timer), or nothing (``quiet``)."""

    def __init__(self, counts: Counts, quiet: bool = False, every: float = 10.0, stream: TextIO | None = None):
        self.counts = counts
        self.quiet = quiet
        self.every = every
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.task: Any = None
        self.last = time.monotonic()

    @property
    def terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self) -> None:
        if self.quiet:
            return
        if self.counts.before:
            self.echo(f"run-batch: {self.counts.before} lines already in the output; {self.counts.total} to run")
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("run-batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} lines/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[errors]} errors"),
                console=Console(file=self.stream), transient=False,
            )
            self.task = self.bar.add_task("lines", total=self.counts.total, rate="0.0", errors=0)
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            counts = self.counts
            self.bar.update(self.task, completed=counts.done, rate=f"{counts.rate:.1f}", errors=counts.errors)

    def tick(self) -> None:
        """Called every second or so: a plain line when ``every`` seconds passed (not on a terminal)."""
        now = time.monotonic()
        if self.quiet or self.bar is not None or now - self.last < self.every:
            return
        self.last = now
        self.echo(self.counts.line())

    def stop(self) -> None:
        if self.bar is not None:
            self.advance()
            self.bar.stop()
            self.bar = None

    def echo(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def summary(self, output: str, errors: str, interrupted: str | None = None) -> str:
        counts = self.counts
        rate = f"{counts.rate:.1f}"
        text = (
            f"run-batch: {counts.done} lines in {counts.elapsed:.1f} s ({rate} lines/s): {counts.answered} answered "
            f"in {output}, {counts.errors} errors in {errors}"
        )
        if counts.before:
            text += f"; {counts.before} done by an earlier run"
        if interrupted:
            text += f"\nrun-batch: {interrupted}: {counts.total - counts.done} lines not run; run the same command again to finish"
        return text
