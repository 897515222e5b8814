"""Progress: the one progress helper; a bar on a terminal, plain log lines elsewhere.

On a terminal (stderr) a rich bar; written to a file or a pipe (a log, a cluster job) a
plain ``Training: 1,200/10,000 steps (12 %), 3.4 steps/s, ETA 43 min`` line at most every
30 s; nothing on ranks other than 0 or with --quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from scbd_cells.core.rank import is_rank_zero

# Set by the command line's --quiet (the entry point configures output, as it does logging).
_settings = {"quiet": False}

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # a piped log gets one progress line at most this often


def _console() -> Console:
    return Console(stderr=True)


def progress_enabled() -> bool:
    """Whether progress bars are shown: on a terminal (stderr), on rank 0, without --quiet.

    A bar written to a file or a pipe (a log, a test, a job scheduler) is noise; there
    :func:`progress_bar` logs plain lines instead.
    """
    return _progress_reported() and _console().is_terminal


def _progress_reported() -> bool:
    """Whether progress is reported at all: on rank 0, without --quiet."""
    return not _settings["quiet"] and is_rank_zero()


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) progress bars in this process."""
    _settings["quiet"] = bool(quiet)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12,345 cells/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(format_rate(speed, self.unit), style="progress.data.speed")


def format_rate(per_second: float, unit: str) -> str:
    """``12,345 cells/s``, ``3.4 steps/s``, or below one per second ``2.5 s/step``."""
    singular = unit[:-1] if unit.endswith("s") else unit
    if per_second <= 0:
        return f"- {unit}/s"
    if per_second < 1:
        return f"{1 / per_second:,.1f} s/{singular}"
    if per_second < 100:
        return f"{per_second:,.1f} {unit}/s"
    return f"{per_second:,.0f} {unit}/s"


class _NullProgress:
    """Stands in for ``rich.progress.Progress`` when bars are off."""

    def add_task(self, *_args, **_kwargs) -> int:
        return 0

    def update(self, *_args, **_kwargs) -> None:
        pass

    def advance(self, *_args, **_kwargs) -> None:
        pass


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``: an ETA as people read it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _LogTask:
    """One task of :class:`LogProgress`: counts, and when its last line was written."""

    def __init__(self, description: str, total: float | None, completed: float, now: float):
        self.description = description
        self.total = total
        self.completed = completed
        self.started_at = completed  # the rate counts this run's items only
        self.start_time = now
        self.last_line = now


class LogProgress:
    """The progress bar's stand-in off a terminal: a plain log line at most every ``every_s``.

    It takes the calls of ``rich.progress.Progress`` that scbd-cells makes (``add_task``,
    ``advance``, ``update``) and logs ``Training: 1,200/10,000 steps (12 %), 3.4 steps/s,
    ETA 43 min`` (rich markup in a description is dropped).
    """

    def __init__(
        self,
        *,
        unit: str,
        every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.every_s = every_s
        self.clock = clock
        self.tasks: list[_LogTask] = []

    def add_task(self, description: str, *, total: float | None = None, completed: float = 0,
                 **_kwargs) -> int:  # fmt: skip
        self.tasks.append(_LogTask(description, total, completed, self.clock()))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, description: str | None = None,
               completed: float | None = None, advance: float | None = None,
               total: float | None = None, **_kwargs) -> None:  # fmt: skip
        task = self.tasks[task_id]
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        now = self.clock()
        if now - task.last_line >= self.every_s:
            task.last_line = now
            logger.info("%s", self.line(task, now=now))

    def line(self, task: _LogTask, *, now: float) -> str:
        """``Training: 1,200/10,000 steps (12 %), 3.4 steps/s, ETA 43 min``."""
        description = Text.from_markup(task.description).plain
        done = f"{task.completed:,.0f}"
        if task.total:
            done += f"/{task.total:,.0f} {self.unit} ({100 * task.completed / task.total:.0f} %)"
        else:
            done += f" {self.unit}"
        elapsed = now - task.start_time
        per_second = (task.completed - task.started_at) / elapsed if elapsed > 0 else 0.0
        parts = [f"{description}: {done}", format_rate(per_second, self.unit)]
        if task.total and per_second > 0:
            parts.append(f"ETA {format_duration((task.total - task.completed) / per_second)}")
        return ", ".join(parts)


@contextmanager
def progress_bar(*, unit: str = "cells") -> Iterator[Progress | LogProgress | _NullProgress]:
    """A rich progress bar with rate and ETA on a terminal, plain log lines elsewhere.

    Use ``task = bar.add_task("Ingesting", total=n)`` then ``bar.advance(task, k)``;
    the bar shows ``unit``/s. Off a terminal (a log file, a pipe, a cluster job) it is a
    :class:`LogProgress`; with --quiet or on ranks other than 0 a no-op object.
    """
    if not _progress_reported():
        yield _NullProgress()
        return
    if not _console().is_terminal:
        yield LogProgress(unit=unit)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console(),
        transient=False,
    ) as bar:
        yield bar
