"""Progress of a dataset job on stderr: samples done, rate and time left.

In a terminal a rich progress bar (``12,000/20,000 samples  350 samples/s  0:00:23 left``); in
a log (stderr not a terminal) one line at every tenth of the job, so a CI log shows the run
moving without a line per shard; nothing when quiet (``--json -``).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from slimdeploy.dataset.execute import Progress
from slimdeploy.numbers import format_count, format_seconds


class _RateColumn(ProgressColumn):
    """Samples per second, over rich's recent window."""

    def render(self, task: Any) -> Text:
        return Text(f"{format_count(task.speed)} samples/s" if task.speed else "- samples/s")


class DatasetProgress(Progress):
    """See the module docstring.

    Args:
        console: where to print (stderr).
        what: what is being done, the bar's label. Defaults to "checking".
        quiet: print nothing. Defaults to False.
    """

    def __init__(self, console: Console, what: str = "checking", quiet: bool = False) -> None:
        self.console, self.what, self.quiet = console, what, quiet
        self.total = self.done = self.first_done = 0
        self.started = time.perf_counter()
        self.next_line = 0.0
        self._bar: RichProgress | None = None
        self._task: Any = None

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.first_done = total, done, done
        self.started = time.perf_counter()
        if self.quiet:
            return
        if done:
            self.console.print(f"resuming: {format_count(done)} of {format_count(total)} samples were finished by an earlier "
                               "run (--work-dir)", soft_wrap=True)
        if self.console.is_terminal:
            self._bar = RichProgress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                                     _RateColumn(), TimeRemainingColumn(), TextColumn("left"), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=total, completed=done)
        self.next_line = (done / total if total else 1.0) + 0.1

    def advance(self, samples: int) -> None:
        self.done += samples
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.advance(self._task, samples)
            return
        fraction = self.done / self.total if self.total else 1.0
        if fraction + 1e-9 >= self.next_line or self.done == self.total:
            self.next_line = fraction + 0.1
            spent = time.perf_counter() - self.started
            rate = (self.done - self.first_done) / spent if spent > 0 else 0.0
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            self.console.print(f"{self.what}: {format_count(self.done)}/{format_count(self.total)} samples, "
                               f"{format_count(rate)} samples/s, {format_seconds(left)} left", soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> DatasetProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
