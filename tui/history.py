"""The history model: a store's snapshots, their hashes, and bases to diff against.

Everything the history screen shows first comes from the store's SQLite
index (``Store.list()`` and ``Store.entries()``), never from blobs, so the
first screen of a 200 × 1,000 store costs a few queries. Blobs are read only
to put numbers on tensors whose hashes differ, and only in workers.

The app reads from Textual thread workers; entry dictionaries are cached
across them, since snapshots are immutable once committed and a cached
answer never goes stale.

No Textual here: the screens call these functions from workers, and the
tests call them directly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptdiff.checkpoint import Checkpoint
from ckptdiff.manifest import Manifest
from ckptdiff.policy import hash_rows, pair_manifest, signature_status, signature_verdicts
from ckptdiff.report import TensorDiff
from ckptdiff.store.history import effective_manifest

BASE_POLICIES = ("first", "previous", "marked")


class StoreHandle:
    """The store, opened on first use from whichever worker thread needs it.

    The store serialises its own SQLite access (one connection opened with
    ``check_same_thread=False`` behind a lock), so one instance serves every
    worker; opening lazily keeps even ``Store.open`` off the UI thread.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._store: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._store is None:
                from ckptdiff.store import Store
                self._store = Store.open(self.path)
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


@dataclass
class SnapshotSummary:
    """Per-snapshot numbers for the history list, computed from hashes."""

    changed_vs_prev: int       # tensors whose bytes differ from the previous snapshot
    drifted_vs_base: int       # frozen tensors that differ from the current base
    stale_vs_base: int


@dataclass
class SeriesPoint:
    """One snapshot's value in a tensor's history (the detail screen's chart)."""

    index: int
    base_index: int
    hash: str | None
    status: str                # identical / changed / added / removed / shape_changed / ...
    diff: TensorDiff | None    # the engine's numbers, when measured


class HistoryModel:
    """Snapshots of one store plus cached hashes; pure logic over them.

    Two caches, because a long history is mostly read for its hashes:
    ``signatures`` ("hash|dtype|shape" strings per tensor, cheap to keep for
    every snapshot and invisible to the garbage collector) feed the list's
    columns and the detail chart; full ``entries`` feed the tensor table and
    are kept only for the last few snapshots looked at.
    """

    ENTRY_CACHE = 8

    def __init__(self, handle: StoreHandle, snapshots: list[Any]) -> None:
        self.handle = handle
        self.snapshots = snapshots
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._sigs: dict[str, dict[str, str]] = {}
        self._all_loaded = False
        self._ids = {s.id for s in snapshots}
        self._lock = threading.Lock()
        by_id = {s.id: s for s in snapshots}
        self._manifests = [effective_manifest(s.id, by_id) for s in snapshots]

    @classmethod
    def load(cls, path: str) -> HistoryModel:
        handle = StoreHandle(path)
        return cls(handle, list(handle.get().list()))

    def __len__(self) -> int:
        return len(self.snapshots)

    # -- metadata -------------------------------------------------------

    def entries(self, index: int) -> dict[str, Any]:
        """name -> the store's Entry (dtype, shape, hash, nbytes) for one snapshot."""
        sid = self.snapshots[index].id
        with self._lock:
            hit = self._entries.get(sid)
            if hit is not None:
                self._entries.move_to_end(sid)
                return hit
        hit = dict(self.handle.get().entries(sid))
        with self._lock:
            self._entries[sid] = hit
            while len(self._entries) > self.ENTRY_CACHE:
                self._entries.popitem(last=False)
            if sid not in self._sigs:
                self._sigs[sid] = {n: _signature(e) for n, e in hit.items()}
        return hit

    def signatures(self, index: int) -> dict[str, str]:
        """name -> "hash|dtype|shape": equal strings mean bitwise-equal tensors of one layout.

        The first call loads every snapshot's in one query (``Store.signatures``):
        the history columns need them all, and one query is ~10x faster than
        one validated ``entries`` call per snapshot.
        """
        sid = self.snapshots[index].id
        sigs = self._sigs.get(sid)
        if sigs is None:
            with self._lock:
                if not self._all_loaded:
                    everything = self.handle.get().signatures()
                    self._sigs.update({k: v for k, v in everything.items() if k in self._ids})
                    self._all_loaded = True
            sigs = self._sigs.get(sid)
            if sigs is None:  # removed from the store since the list was read
                self.entries(index)
                sigs = self._sigs[sid]
        return sigs

    def manifest(self, index: int, base: int | None = None) -> Manifest | None:
        """The manifest that decides roles when ``index`` is compared with ``base``.

        The one in force at ``index`` (its own, or the latest earlier one),
        with both sides' training state as buffers: what the engine applies
        to the two opened snapshots (:func:`ckptdiff.policy.pair_manifest`).
        """
        base = index if base is None else base
        aux = self.snapshots[base].auxiliary + self.snapshots[index].auxiliary
        return pair_manifest(None, self._manifests[base], self._manifests[index], aux)

    def base_index(self, index: int, policy: str, marked: int | None) -> int:
        """Which snapshot ``index`` is compared with under a base policy."""
        if policy == "previous":
            return max(0, index - 1)
        if policy == "marked" and marked is not None:
            return marked
        return 0

    def quick_rows(self, index: int, base: int) -> list[TensorDiff]:
        """The tensor table for ``index`` vs ``base`` from hashes alone."""
        return hash_rows(self.entries(base), self.entries(index), self.manifest(index, base),
                         self_compare=base == index)

    def summary(self, index: int, policy: str, marked: int | None) -> SnapshotSummary:
        """The list's columns for one snapshot; the policy's verdicts, from signatures."""
        cur = self.signatures(index)
        prev = self.signatures(index - 1) if index > 0 else cur
        changed = sum(1 for n, sig in cur.items() if prev.get(n) != sig)
        changed += sum(1 for n in prev if n not in cur)
        base = self.base_index(index, policy, marked)
        drifted: list[str] = []
        stale: list[str] = []
        if base != index:
            drifted, stale = signature_verdicts(self.signatures(base), cur, self.manifest(index, base))
        return SnapshotSummary(changed, len(drifted), len(stale))

    # -- blobs (workers only) ---------------------------------------------

    def open(self, index: int) -> Checkpoint:
        return self.handle.get().open_snapshot(self.snapshots[index].id)

    def series(self, name: str, policy: str, marked: int | None, *, atol: float = 0.0, rtol: float = 0.0,
               cancelled: Callable[[], bool] = lambda: False) -> list[SeriesPoint]:
        """One tensor vs its base across the whole history.

        Equal hashes are answered without reading a blob, and each distinct
        (old hash, new hash) pair is measured once, so a frozen tensor that
        drifted in 3 of 200 snapshots costs 3 small reads, not 200.
        """
        from .measure import measure

        points: list[SeriesPoint] = []
        measured: dict[tuple[str, str], TensorDiff] = {}
        opened: dict[int, Checkpoint] = {}

        def ckpt(i: int) -> Checkpoint:
            if i not in opened:
                if len(opened) > 4:  # keep at most a few open; "first" reuses one base
                    for k in [k for k in opened if k != 0][:1]:
                        opened.pop(k).close()
                opened[i] = self.open(i)
            return opened[i]

        try:
            for i in range(len(self.snapshots)):
                if cancelled():
                    break
                b = self.base_index(i, policy, marked)
                old, new = self.signatures(b).get(name), self.signatures(i).get(name)
                status = signature_status(old, new)
                point = SeriesPoint(i, b, new.split("|")[0] if new else None, status, None)
                if status == "changed":
                    assert old is not None and new is not None
                    key = (old.split("|")[0], new.split("|")[0])
                    if key not in measured:
                        got = measure(ckpt(b), ckpt(i), [name], self.manifest(i, b), atol=atol, rtol=rtol)
                        if got:
                            measured[key] = got[0]
                    point.diff = measured.get(key)
                points.append(point)
        finally:
            for c in opened.values():
                c.close()
        return points


def _signature(e: Any) -> str:
    return f"{e.hash}|{e.dtype}|{','.join(str(int(d)) for d in e.shape)}"


def first_change(points: list[SeriesPoint]) -> SeriesPoint | None:
    """The first snapshot where the tensor differs from its base (drift, for a frozen one)."""
    for p in points:
        if p.status not in ("identical", "absent") and p.index != p.base_index:
            return p
    return None
