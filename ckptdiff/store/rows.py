"""Rows <-> dataclasses: how snapshots and entries are written to and read from SQLite.

Everything read back is treated as untrusted (a store may be damaged or
hand-edited): dtypes must be in the table, shapes must be sane, sizes must
match dtype x shape and hashes must be 64 hex digits before any of them
names a file or sizes a read.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from blake3 import blake3

from .. import dtypes
from ..checkpoint import check_shape
from ..errors import CkptError, FormatError
from ..manifest import Manifest
from .blobs import valid_hash
from .model import Entry, Metric, SnapshotInfo

_BASE_COLS = "seq, id, parent, created_at, step, tag, message, metrics, manifest, source, n_tensors, total_bytes"


def snap_cols(has_auxiliary: bool) -> str:
    """The snapshot columns read everywhere; a store made before the ``auxiliary``
    column existed (and not written to since) reads it as NULL."""
    return _BASE_COLS + (", auxiliary" if has_auxiliary else ", NULL")


def auxiliary_to_json(names: tuple[str, ...] | list[str]) -> str | None:
    return json.dumps(list(names)) if names else None


def auxiliary_from_json(raw: Any) -> tuple[str, ...]:
    """Untrusted: anything but a JSON list of strings reads as none."""
    if not isinstance(raw, str):
        return ()
    try:
        v = json.loads(raw)
    except (ValueError, RecursionError):
        return ()
    return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()


def new_id() -> str:
    """16 hex digits (64 random bits): unique in practice, short enough to type a prefix of."""
    return blake3(os.urandom(16) + time.time_ns().to_bytes(8, "little")).hexdigest()[:16]


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise CkptError(f"metric names must be strings, got {k!r}")
        if isinstance(v, bool):
            v = int(v)
        elif hasattr(v, "item") and not isinstance(v, (int, float, str)):
            v = v.item()  # numpy / torch scalars
        if not isinstance(v, (int, float, str)):
            raise CkptError(f"metric {k!r} must be a number or a string, got {type(v).__name__}")
        out[k] = v
    return out


def manifest_to_json(m: Manifest | None) -> str | None:
    if m is None:
        return None
    return json.dumps({"trainable": list(m.trainable), "frozen": list(m.frozen), "buffers": list(m.buffers),
                       "source": m.source})


def manifest_from_json(raw: str | None, where: str) -> Manifest | None:
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return Manifest(tuple(d.get("trainable", ())), tuple(d.get("frozen", ())), tuple(d.get("buffers", ())),
                        source=str(d.get("source", "")))
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise FormatError("a snapshot's manifest in the store database is damaged", where) from None


def entry_from_row(name: str, dt: str, shape: str, h: str, nbytes: int, where: str) -> Entry:
    """Build an Entry from database values, treating them as untrusted."""
    info = dtypes.get(dt) if isinstance(dt, str) else dtypes.get(repr(dt))
    try:
        dims = json.loads(shape)
    except (ValueError, TypeError, RecursionError):
        raise FormatError(f"tensor {name!r} has a damaged shape in the store database", where) from None
    if not isinstance(dims, list):
        raise FormatError(f"tensor {name!r} has a damaged shape in the store database", where)
    dims_t = check_shape(name, dims)
    expect = math.prod(dims_t) * info.itemsize
    if not isinstance(nbytes, int) or nbytes != expect:
        raise FormatError(f"tensor {name!r}: recorded size {nbytes} does not match {dt}{list(dims_t)}", where)
    if not valid_hash(h):
        raise FormatError(f"tensor {name!r} has an invalid hash in the store database", where)
    return Entry(name, info.name, dims_t, h, nbytes)


def info_from_row(row: tuple[Any, ...], root: str) -> SnapshotInfo:
    """A SnapshotInfo from a :func:`snap_cols` row."""
    _seq, sid, parent, created, step, tag, message, metrics, manifest, source, n, total, aux = row
    where = f"{root}@{sid}"
    try:
        m = json.loads(metrics) if metrics else {}
    except (ValueError, TypeError, RecursionError):
        m = {}
    return SnapshotInfo(sid, parent, float(created), step, tag, message, m if isinstance(m, dict) else {},
                        manifest_from_json(manifest, where), source, int(n), int(total),
                        auxiliary_from_json(aux))
