"""A deadline for C library calls that may never return (the CLI's HDF5 reads).

A corrupted HDF5 file can make the HDF5 C library loop forever inside one
call while holding the GIL (seen with HDF5 2.0.0 on a damaged global heap
behind a variable-length string attribute). No Python code can interrupt
that, so the deadline is kept by ``ckptdiff._watchdog``, a plain C thread:
if the guarded block has not finished in time it prints one
``ckptdiff: error: ...`` line and ends the process with exit code 2.

Only the CLI turns this on (:func:`enabled`, around each command): a
library must not end its caller's process. Without the C module (no compiler at install time) or on
Windows, guarded blocks run without a deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

try:
    from . import _watchdog as _C
except (ImportError, OSError):  # pragma: no cover - no C compiler at install time, or no fork handler
    _C = None

#: Seconds the HDF5 library may spend opening a file and reading its metadata.
HDF5_TIMEOUT_ENV = "CKPTDIFF_HDF5_TIMEOUT"
HDF5_TIMEOUT_DEFAULT = 120.0
#: Seconds any reader may spend opening a file (its header, pickle, directory, metadata).
OPEN_TIMEOUT_ENV = "CKPTDIFF_OPEN_TIMEOUT"
OPEN_TIMEOUT_DEFAULT = 300.0

_enabled = False


@contextmanager
def enabled() -> Iterator[None]:
    """Inside this block, guarded blocks may end the process (the CLI runs each command in it)."""
    global _enabled
    before, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = before


def available() -> bool:
    return _C is not None and bool(_C.AVAILABLE)


def hdf5_timeout() -> float:
    return _seconds(HDF5_TIMEOUT_ENV, HDF5_TIMEOUT_DEFAULT)


def open_timeout() -> float:
    return _seconds(OPEN_TIMEOUT_ENV, OPEN_TIMEOUT_DEFAULT)


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    try:
        v = float(raw) if raw else default
    except ValueError:
        return default
    return v if 0 < v <= 1e6 else default


#: Deadlines in force, outermost first: (expiry on the monotonic clock, the line to print).
_active: list[tuple[float, bytes]] = []


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Run the block; if enabled and it takes longer than ``seconds``, print
    ``ckptdiff: error: <message>`` and exit with code 2 from a C thread.

    Deadlines nest: the C thread counts down to whichever expires first (and
    prints that one's message, which names what was slow); leaving an inner
    block re-arms the outer one for the time it has left.
    """
    if not _enabled or not available():
        yield
        return
    assert _C is not None
    from .textsafe import one_line

    line = ("ckptdiff: error: " + one_line(message) + "\n").encode("utf-8", "backslashreplace")
    _active.append((time.monotonic() + seconds, line))
    _arm_soonest()
    try:
        yield
    finally:
        _active.pop()
        if _active:
            _arm_soonest()
        else:
            _C.disarm()


def _arm_soonest() -> None:
    assert _C is not None
    expiry, line = min(_active)
    _C.arm(max(expiry - time.monotonic(), 0.001), line)


__all__ = ["enabled", "available", "deadline", "hdf5_timeout", "open_timeout", "HDF5_TIMEOUT_ENV",
           "OPEN_TIMEOUT_ENV"]
