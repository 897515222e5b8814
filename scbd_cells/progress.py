"""Progress: the one rich progress helper; bars only on a terminal, on rank 0, unless --quiet."""

from __future__ import annotations

import os
from collections.abc import Iterator
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

# Set by the command line's --quiet (the entry point configures output, as it does logging).
_settings = {"quiet": False}


def _console() -> Console:
    return Console(stderr=True)


def progress_enabled() -> bool:
    """Whether progress bars are shown: on a terminal (stderr), on rank 0, without --quiet.

    A bar written to a file or a pipe (a log, a test, a job scheduler) is noise.
    """
    if _settings["quiet"] or int(os.environ.get("RANK", "0")) != 0:
        return False
    return _console().is_terminal


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


@contextmanager
def progress_bar(*, unit: str = "cells") -> Iterator[Progress | _NullProgress]:
    """A rich progress bar with rate and ETA; a no-op object when bars are off.

    Use ``task = bar.add_task("Ingesting", total=n)`` then
    ``bar.advance(task, k)``; the bar shows ``unit``/s.
    """
    if not progress_enabled():
        yield _NullProgress()
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
