"""The snapshot store: a deduplicated, versioned history of tensors.

A store is a directory::

    DIR/ckptdiff.db      SQLite (WAL): format version, snapshots, entries
    DIR/blobs/<blake3>   one file per distinct tensor byte string of 64 KiB or more
    DIR/packs/           smaller ones, many to a pack file with an index
    DIR/tmp/             blobs and packs being written (renamed into place when complete)

Each distinct byte string is stored once whatever its name or snapshot, so a
fine-tune's hundred snapshots cost one model plus the bytes that changed. A
snapshot opens as a regular :class:`~ckptdiff.checkpoint.Checkpoint`
(``open_checkpoint("DIR@REF")``), so every diff feature works on history.

Modules: ``store`` (the Store class), ``blobs`` (content-addressed objects),
``packs`` (pack files of small objects),
``compress`` (zstd over byte planes), ``db`` (schema and format version),
``refs`` (ref syntax), ``history`` (log rows), ``export`` (writing files back),
``model`` (the dataclasses), ``layout`` (what makes a directory a store,
answered without importing the rest: this package imports its other names
when they are first used).
"""

from __future__ import annotations

import importlib

from .layout import DB_NAME, is_store

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

    from .db import FORMAT_VERSION
    from .history import LogRow
    from .model import BadBlob, Entry, GcResult, SnapshotInfo, VerifyResult
    from .store import Store, open_snapshot

#: The rest of the package's names, each imported from its module when first
#: used: ``is_store`` (asked of every directory a diff is given) must not cost
#: importing sqlite3 and the store.
_LAZY = {"Store": "store", "open_snapshot": "store", "FORMAT_VERSION": "db", "LogRow": "history",
         "SnapshotInfo": "model", "Entry": "model", "VerifyResult": "model", "BadBlob": "model",
         "GcResult": "model"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Store", "is_store", "open_snapshot", "SnapshotInfo", "Entry", "VerifyResult", "BadBlob",
           "GcResult", "LogRow", "DB_NAME", "FORMAT_VERSION"]
