"""Byte progress bars for long store work (snapshot, verify, export).

A bar appears only when asked for, on stderr, when stderr is a terminal and
the work is big enough to be worth watching, so piped output and tests stay
clean. rich is imported only when a bar is really drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Work smaller than this finishes before a bar would be readable.
MIN_BYTES = 64 << 20


@contextmanager
def byte_progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_bytes)``; draws a rich bar only when it helps."""
    if not enabled or total < MIN_BYTES or not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
