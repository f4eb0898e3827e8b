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
``model`` (the dataclasses).
"""

from __future__ import annotations

from .db import DB_NAME, FORMAT_VERSION
from .history import LogRow
from .model import BadBlob, Entry, GcResult, SnapshotInfo, VerifyResult
from .store import Store, is_store, open_snapshot

__all__ = ["Store", "is_store", "open_snapshot", "SnapshotInfo", "Entry", "VerifyResult", "BadBlob",
           "GcResult", "LogRow", "DB_NAME", "FORMAT_VERSION"]
