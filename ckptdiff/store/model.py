"""The store's dataclasses: what a snapshot is, what one of its tensors is, and
what verify and gc report.

They carry no behaviour that touches disk, so the CLI, the TUI and the hook
can hold and render them without a store open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..manifest import Manifest

Metric = float | int | str


def json_value(x: Any) -> Any:
    """JSON has no nan/inf: write them as strings so output stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


#: Metric names that carry one value per tensor ("drift_max_abs/<tensor name>", recorded by the
#: training hook with a drift snapshot). They are detail for one snapshot (``show``), not a
#: column of a history: a 61-layer model would make them 61 entries of one ``log`` row.
PER_TENSOR_METRIC_PREFIXES = ("drift_max_abs/",)


def is_per_tensor_metric(name: str) -> bool:
    return name.startswith(PER_TENSOR_METRIC_PREFIXES)


@dataclass(frozen=True)
class Entry:
    """One tensor of a snapshot: enough to compare by hash without reading a blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    hash: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "hash": self.hash, "nbytes": self.nbytes}


@dataclass
class SnapshotInfo:
    """One row of history. ``manifest`` is the snapshot's own (None: inherits)."""

    id: str
    parent: str | None
    created_at: float
    step: int | None
    tag: str | None
    message: str | None
    metrics: dict[str, Metric]
    manifest: Manifest | None
    source: str | None
    n_tensors: int
    total_bytes: int
    #: Top-level names of training state saved beside the model in the source
    #: checkpoint (a .pt's ``optimizer``, ...; see Checkpoint.auxiliary).
    auxiliary: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "created_at": self.created_at,
            "step": self.step,
            "tag": self.tag,
            "message": self.message,
            "metrics": {k: json_value(v) for k, v in self.metrics.items()},
            "manifest": None if self.manifest is None else self.manifest.to_dict(),
            "source": self.source,
            "n_tensors": self.n_tensors,
            "total_bytes": self.total_bytes,
            "auxiliary": list(self.auxiliary),
        }


@dataclass
class BadBlob:
    """A blob verify could not vouch for, and every (snapshot id, tensor name) that needs it."""

    hash: str
    problem: str
    affected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class VerifyResult:
    blobs_checked: int = 0
    bytes_checked: int = 0
    bad: list[BadBlob] = field(default_factory=list)
    #: Problems that are not one blob's (database integrity, bad entries).
    errors: list[str] = field(default_factory=list)
    #: Blob files no snapshot references (harmless; ``gc`` removes them).
    unreferenced: int = 0
    snapshots: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "ckptdiff.verify/1",
            "ok": self.ok,
            "snapshots": self.snapshots,
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
            "unreferenced_blobs": self.unreferenced,
            "errors": list(self.errors),
            "bad_blobs": [
                {"hash": b.hash, "problem": b.problem,
                 "affected": [{"snapshot": s, "tensor": t} for s, t in b.affected]}
                for b in self.bad
            ],
        }


@dataclass
class GcResult:
    snapshots_removed: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0
    temp_files_removed: int = 0
    blobs_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "ckptdiff.gc/1",
            "snapshots_removed": list(self.snapshots_removed),
            "blobs_removed": self.blobs_removed,
            "bytes_freed": self.bytes_freed,
            "temp_files_removed": self.temp_files_removed,
            "blobs_kept": self.blobs_kept,
        }
