"""Progress: the one rich progress helper, silent when asked, on non-zero ranks and in tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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

_QUIET_ENV = "SCBD_CELLS_QUIET"


def progress_enabled() -> bool:
    """Whether progress bars are shown (not with ``--quiet``, on rank > 0, or under pytest)."""
    if os.environ.get(_QUIET_ENV) == "1":
        return False
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    return "PYTEST_CURRENT_TEST" not in os.environ


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) progress bars for this process and its children."""
    if quiet:
        os.environ[_QUIET_ENV] = "1"
    else:
        os.environ.pop(_QUIET_ENV, None)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12,345 cells/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


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
        transient=False,
    ) as bar:
        yield bar
