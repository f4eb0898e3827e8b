"""The gc lock: keeps ``gc`` from deleting blobs a snapshot is about to reference.

Between writing its blobs and committing, a snapshot's new blobs are
referenced by nothing, exactly like garbage. Writers therefore hold a shared
``flock`` on ``DIR/gc.lock`` for the whole snapshot and ``gc`` takes it
exclusively while it deletes: any number of writers run together, gc waits
for them (and they for it). The kernel drops the lock of a killed process,
so a crash never leaves the store locked. Where ``fcntl`` does not exist
(Windows) the lock is a no-op and the snapshot's commit-time blob check,
which rewrites anything missing, is the only guard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

LOCK_NAME = "gc.lock"


@contextmanager
def gc_lock(root: str, *, exclusive: bool) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
