"""Progress: the callback long work reports through, and the one bar that shows it.

The engine and the store only *report* progress, as ``progress(done_bytes,
total_bytes)`` calls through a :class:`Meter`; they draw nothing. Whoever
has a screen decides how to show it: the CLI and the training hook wrap
their calls in :func:`byte_bar`, a rich bar on stderr that appears only on a
terminal and only for work big enough to watch, so piped output, CI logs and
tests stay clean. rich is imported only when a bar is really drawn.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

#: ``progress(done_bytes, total_bytes)``; called often, keep it cheap.
ProgressFn = Callable[[int, int], None]

#: Work smaller than this finishes before a bar would be readable.
MIN_BYTES = 64 << 20


class Meter:
    """Turns per-chunk byte counts (from any thread) into ``progress(done, total)`` calls."""

    __slots__ = ("fn", "total", "done", "_lock")

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"progress must be a callable progress(done, total) or None, not {fn!r}")
        self.fn, self.total, self.done = fn, total, 0
        self._lock = threading.Lock()  # advanced from worker threads
        if fn is not None:
            fn(0, total)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self.fn is not None:
                self.fn(self.done, self.total)

    @property
    def sink(self) -> Callable[[int], None]:
        """:meth:`advance`, or a no-op when nobody watches (no lock per chunk then)."""
        return self.advance if self.fn is not None else _ignore

    def finish(self) -> None:
        if self.fn is not None and self.done != self.total:
            self.fn(self.total, self.total)


def _ignore(_nbytes: int) -> None:
    pass


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def byte_bar(description: str, *, enabled: bool = True, min_bytes: int | None = None) -> Iterator[ProgressFn | None]:
    """Yield a ``progress(done, total)`` callback that draws a bar, or None when no bar can help.

    None (nothing to call) when disabled or stderr is not a terminal; the bar
    itself starts at the first report of at least ``min_bytes`` (default
    :data:`MIN_BYTES`) in total.
    """
    if not enabled or not stderr_is_tty():
        yield None
        return
    bar = _Bar(description, MIN_BYTES if min_bytes is None else min_bytes)
    try:
        yield bar.update
    finally:
        bar.stop()


class _Bar:
    def __init__(self, description: str, min_bytes: int) -> None:
        self.description, self.min_bytes = description, min_bytes
        self._progress: Any = None
        self._task: Any = None
        self._lock = threading.Lock()

    def update(self, done: int, total: int) -> None:
        with self._lock:
            if self._progress is None:
                if total < self.min_bytes:
                    return
                from rich.console import Console
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                           TransferSpeedColumn)
                self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                          TransferSpeedColumn(), TimeRemainingColumn(),
                                          console=Console(stderr=True), transient=True)
                self._progress.start()
                self._task = self._progress.add_task(self.description, total=total)
            self._progress.update(self._task, completed=done, total=total)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


__all__ = ["ProgressFn", "Meter", "byte_bar", "stderr_is_tty", "MIN_BYTES"]
