"""Progress bars for long work (backup, restore, verify): bytes, rate, ETA.

A bar is drawn only when standard error is a terminal and the caller did not
ask for JSON; otherwise :func:`progress` hands out a no-op counter, so
scripts and logs never see control characters.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

Advance = Callable[[int], None]


def _noop(_n: int) -> None:
    pass


def wanted(args: object) -> bool:
    """Did the command line leave the bar on (no ``--json``, no ``--no-progress``)?"""
    return not getattr(args, "json", False) and not getattr(args, "no_progress", False)


def enabled(want: bool = True) -> bool:
    return want and sys.stderr.isatty()


@contextlib.contextmanager
def progress(description: str, total: int | None, *, show: bool = True) -> Iterator[Advance]:
    """``with progress("disk0", size) as advance: advance(n)``.

    ``advance`` is thread-safe. With ``show`` false or stderr not a terminal,
    it does nothing.
    """
    if not enabled(show):
        yield _noop
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    lock = threading.Lock()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            with lock:
                bar.advance(task, n)

        yield advance
