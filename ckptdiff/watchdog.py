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
from collections.abc import Iterator
from contextlib import contextmanager

try:
    from . import _watchdog as _C
except (ImportError, OSError):  # pragma: no cover - no C compiler at install time, or no fork handler
    _C = None

#: Seconds the HDF5 library may spend opening a file and reading its metadata.
HDF5_TIMEOUT_ENV = "CKPTDIFF_HDF5_TIMEOUT"
HDF5_TIMEOUT_DEFAULT = 120.0

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
    raw = os.environ.get(HDF5_TIMEOUT_ENV, "").strip()
    try:
        v = float(raw) if raw else HDF5_TIMEOUT_DEFAULT
    except ValueError:
        return HDF5_TIMEOUT_DEFAULT
    return v if 0 < v <= 1e6 else HDF5_TIMEOUT_DEFAULT


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Run the block; if enabled and it takes longer than ``seconds``, print
    ``ckptdiff: error: <message>`` and exit with code 2 from a C thread."""
    if not _enabled or not available():
        yield
        return
    assert _C is not None
    line = "ckptdiff: error: " + " ".join(message.split()) + "\n"
    _C.arm(seconds, line.encode("utf-8", "backslashreplace"))
    try:
        yield
    finally:
        _C.disarm()


__all__ = ["enabled", "available", "deadline", "hdf5_timeout", "HDF5_TIMEOUT_ENV"]
