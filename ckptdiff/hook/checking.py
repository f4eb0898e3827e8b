"""Drift checking and confirmation: the cheap per-step check, then an exact verdict for each suspect.

The check (:mod:`.fingerprint`) only says "these bits are not the
baseline's". Each suspect is then captured, compared exactly with the
baseline bytes in the store (:func:`.drift.compare`) on the writer thread,
and recorded as a snapshot tagged ``drift``; a suspect whose bytes turn out
equal is re-based and cleared. Each tensor is reported once, then no longer
checked. On CUDA (unless ``on_drift="raise"``, or under torch.distributed)
the checksums are read one check later, so the check never syncs the
training thread.

Under torch.distributed each rank checks its own tensors (its DDP replica,
its FSDP2 shards); the tracker then agrees on one verdict for all ranks
(:mod:`.distributed`), measured exactly by the rank that writes the history.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .alerts import DriftWarning, warn
from .capture import Capture
from .distributed import Collectives
from .drift import DriftEvent, FrozenDriftError, compare, hint_for
from .failures import FailureLog
from .fingerprint import FrozenWatch, Pending
from .model import ModelTensors
from .schedule import SnapshotSchedule
from .snapshots import SnapshotChain

_WARN_LINES = 12


class DriftChecker:
    """Watches the frozen tensors of one tracker and turns suspects into confirmed :class:`DriftEvent`s."""

    def __init__(self, tensors: ModelTensors, schedule: SnapshotSchedule, *, backstop_every: int,
                 optimizer_ids: set[int], defer: bool, step: int) -> None:
        slots = tensors.slots
        self.frozen_idx = schedule.frozen_idx
        self.watch = FrozenWatch([slots[i] for i in self.frozen_idx], backstop_groups=backstop_every,
                                 owners=[tensors.owner.get(slots[i].name, slots[i].name.rpartition(".")[0])
                                         for i in self.frozen_idx],
                                 at_risk=[k for k, i in enumerate(self.frozen_idx)
                                          if id(slots[i].tensor) in optimizer_ids])
        self.watch.set_baseline(step)
        #: Read checksums a check later (CUDA without on_drift="raise"): no host sync on the training thread.
        self.defer = defer
        self.pending: Pending | None = None
        self.events: list[DriftEvent] = []
        self._index = {slot.name: k for k, slot in enumerate(self.watch.slots)}

    def drifted_slots(self) -> list[int]:
        """Slot indices of the frozen tensors already reported (snapshots keep recording them)."""
        return [self.frozen_idx[i] for i in self.watch.drifted]

    def check(self, step: int, *, everything: bool = False) -> list[tuple[int, int]]:
        """Run the check; (watch index, step it was seen) for each suspect, read now or from the last check."""
        suspects: list[tuple[int, int]] = []
        if self.pending is not None:
            pend, self.pending = self.pending, None
            suspects += [(i, pend.step) for i in self.watch.collect(pend)]
        defer = self.defer and not everything
        pend = self.watch.launch(step, everything=everything, defer=defer)
        if pend is not None:
            if defer:
                self.pending = pend
            else:
                suspects += [(i, pend.step) for i in self.watch.collect(pend)]
        return suspects

    def index_of(self, event: DriftEvent) -> int:
        """The watch index of the tensor an event is about."""
        return self._index[event.name]

    def unconfirmed(self, i: int, step: int, last_clean: int) -> DriftEvent:
        """An event on the checksum's word only (no baseline bytes to measure against on this rank)."""
        s = self.watch.slots[i]
        return DriftEvent(step, tuple(s.names), s.kind, s.tensor.numel(), None, None, last_clean)

    def settle(self, events: Sequence[DriftEvent], cleared: Sequence[int], step: int) -> None:
        """Stop checking what was reported (once per tensor); re-base what the exact comparison cleared."""
        for i in cleared:
            self.watch.mark_clean(i, step)
        for e in events:
            self.watch.mark_drifted(self.index_of(e))
        self.events.extend(events)

    def agree(self, comm: Collectives, agreed: list[int], events: list[DriftEvent], when: int,
              last_clean: dict[int, int]) -> tuple[list[DriftEvent], list[int]]:
        """Every rank reports the same tensors at the same step, each event naming the ranks that saw it.

        ``events`` are this rank's verdicts on the ``agreed`` suspects; returns
        the events every rank reports and the suspects no rank found moved.
        """
        own = {self.index_of(e): e for e in events}
        by_rank = comm.flags_by_rank(len(self.watch.slots), own)
        final = []
        for i in sorted(set().union(*by_rank)):
            e = own.get(i) or self.unconfirmed(i, when, last_clean[i])
            final.append(dataclasses.replace(e, ranks=tuple(r for r, seen in enumerate(by_rank) if i in seen)))
        return final, [i for i in agreed if not any(i in seen for seen in by_rank)]

    def confirm(self, store: Any, cap: Capture, chain: SnapshotChain, failures: FailureLog, watch_idx: list[int],
                step: int, snap_step: int, last_clean: dict[int, int]) -> tuple[list[DriftEvent], list[int]]:
        """Writer thread: exact comparison with the baseline bytes, then the ``drift`` snapshot.

        ``step`` is when the drift was seen; ``snap_step`` when the bytes were
        captured (later by one check on the deferred CUDA path).
        """
        cap.wait()
        base = None
        if chain.baseline_id is not None:
            try:
                base = store.open_snapshot(chain.baseline_id)
            except Exception as e:  # noqa: BLE001 - degrade to checksum-only events
                failures.record(f"reading the baseline to confirm a drift: {e}")
        events: list[DriftEvent] = []
        cleared: list[int] = []
        for i in watch_idx:
            slot = self.watch.slots[i]
            changed: int | None = None
            mad: float | None = None
            if base is not None and slot.name in base:
                try:
                    changed, mad = compare(base[slot.name], cap.refs[slot.name])
                except Exception as e:  # noqa: BLE001
                    failures.record(f"comparing {slot.name} with the baseline: {e}")
                if changed == 0:
                    cleared.append(i)
                    continue
            events.append(DriftEvent(step, tuple(slot.names), slot.kind, slot.tensor.numel(), changed, mad,
                                     last_clean[i]))
        if not events:
            return events, cleared
        try:
            sid = chain.write(store, cap, step=snap_step, tag="drift", message=_snapshot_message(events, step),
                              metrics=_drift_metrics(events))
            events = [dataclasses.replace(e, snapshot=sid) for e in events]
        except Exception as e:  # noqa: BLE001
            failures.record(f"writing the drift snapshot at step {step}: {e}")
        return events, cleared


def _snapshot_message(events: Sequence[DriftEvent], step: int) -> str:
    first = events[0]
    more = f" and {len(events) - 1} more" if len(events) > 1 else ""
    mad = f"max |Δ| = {first.max_abs_delta:.6g}" if first.confirmed else "checksum differs"
    return f"frozen drift at step {step}: {first.name} ({mad}){more}"


def _drift_metrics(events: Sequence[DriftEvent]) -> dict[str, Any]:
    return {f"drift_max_abs/{e.name}": e.max_abs_delta for e in events
            if e.max_abs_delta is not None and math.isfinite(e.max_abs_delta)}


def act(events: Sequence[DriftEvent], step: int, on_drift: str) -> None:
    """Warn, raise or only record, as ``on_drift`` says."""
    if on_drift == "raise":
        raise FrozenDriftError(events, step)
    if on_drift == "warn":
        shown = [f"  {e.describe()}" for e in events[:_WARN_LINES]]
        if len(events) > _WARN_LINES:
            shown.append(f"  ... and {len(events) - _WARN_LINES} more (tracker.drift_events has them all)")
        msg = "\n".join([f"ckptdiff: frozen tensors moved at step {step}:"] + shown + [hint_for(events)])
        warn(DriftWarning(msg.rstrip()))


__all__ = ["DriftChecker", "act"]
