"""A history measured against its baseline: what ``report`` draws and ``log --causes`` names.

For a store, every snapshot is diffed against the first (the checkpoint a
fine-tune started from) by the real engine: tensors with equal hashes are
answered without a read, so only what moved is measured, and every number
and cause is the one ``ckptdiff diff`` prints. For two files the timeline
has a single column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .report import DiffReport


@dataclass
class Column:
    """One snapshot (or the NEW file) of the timeline."""

    label: str                        # "#3 step 300 [tag]" or the file name
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timeline:
    """``reports[j]``: baseline vs column j, tensors in ``names`` order where present."""

    title: str
    baseline: str
    names: list[str]
    columns: list[Column]
    reports: list[DiffReport]

    @property
    def final(self) -> DiffReport:
        """Baseline vs the last column: the table and the verdict."""
        return self.reports[-1]

    def cell(self, j: int) -> dict[str, Any]:
        """``name -> TensorDiff`` of column j."""
        return {t.name: t for t in self.reports[j].tensors}


def _label(index: int, step: int | None, tag: str | None) -> str:
    return f"#{index}" + (f" step {step}" if step is not None else "") + (f" [{tag}]" if tag else "")


def from_store(path: str, *, manifest: Any = None, atol: float = 0.0, rtol: float = 0.0,
               rank: int | None = None) -> Timeline:
    """Every snapshot of the store at ``path`` diffed against the first."""
    from .api import diff
    from .errors import CkptError
    from .store import Store

    with Store.open(path) as store:
        infos = store.list()
        if not infos:
            raise CkptError("the store holds no snapshots yet", path)
        base = store.open_snapshot(infos[0].id)
        try:
            names = list(base)
            seen = set(names)
            reports, columns = [], []
            for k, info in enumerate(infos):
                snap = store.open_snapshot(info.id)
                try:
                    reports.append(diff(base, snap, manifest=manifest, atol=atol, rtol=rtol, rank=rank))
                finally:
                    snap.close()
                for t in reports[-1].tensors:  # tensors added later go after the baseline's
                    if t.name not in seen:
                        seen.add(t.name)
                        names.append(t.name)
                columns.append(Column(_label(k, info.step, info.tag), info.step, dict(info.metrics)))
        finally:
            base.close()
    return Timeline(title=path, baseline=_label(0, infos[0].step, infos[0].tag), names=names,
                    columns=columns, reports=reports)


def from_pair(old: str, new: str, *, manifest: Any = None, atol: float = 0.0, rtol: float = 0.0,
              rank: int | None = None) -> Timeline:
    """One diff as a one-column timeline."""
    from .api import diff

    rep = diff(old, new, manifest=manifest, atol=atol, rtol=rtol, rank=rank)
    return Timeline(title=f"{old} → {new}", baseline=old, names=[t.name for t in rep.tensors],
                    columns=[Column(new)], reports=[rep])




def drift_causes(path: str, drifted: Mapping[str, Sequence[str]], *, atol: float = 0.0,
                 rtol: float = 0.0) -> dict[str, dict[str, tuple[str | None, dict[str, Any] | None]]]:
    """``{snapshot id: {tensor: (cause, cause_detail)}}`` for the drifted tensors ``log`` found.

    Only those tensors are read (the first snapshot's and each drifted
    one's), through the engine, so a cause here is the one ``diff`` gives.
    A tensor that was removed or reshaped has no cause (None).
    """
    from .api import diff
    from .store import Store

    out: dict[str, dict[str, tuple[str | None, dict[str, Any] | None]]] = {}
    with Store.open(path) as store:
        infos = store.list()
        if not infos:
            return out
        base = store.open_snapshot(infos[0].id)
        try:
            for sid, names in drifted.items():
                if not names:
                    continue
                snap = store.open_snapshot(sid)
                try:
                    rep = diff(base.subset(names), snap.subset(names), atol=atol, rtol=rtol)
                finally:
                    snap.close()
                out[sid] = {t.name: (t.cause, t.cause_detail) for t in rep.tensors}
        finally:
            base.close()
    return out


__all__ = ["Column", "Timeline", "from_store", "from_pair", "drift_causes"]
