"""What a confirmed frozen-tensor drift is, and the exact comparison that confirms it.

The on-device checksum only says "these bits are not the baseline's". Users
act on numbers ("0.1678 -> 0.1674"), so every reported drift is re-measured
against the baseline bytes in the store: how many elements differ bitwise
and the largest absolute difference, in float64, streamed in chunks so a
large tensor never needs a float64 copy of itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..checkpoint import TensorRef

_CHUNK = 4 << 20


@dataclass(frozen=True)
class DriftEvent:
    """One frozen tensor found moved at ``step``."""

    step: int
    names: tuple[str, ...]
    kind: str  # "param" or "buffer"
    numel: int
    #: Elements that differ bitwise from the baseline; None if the baseline bytes were unavailable.
    changed: int | None
    #: Largest |current - baseline| in float64 over the changed elements; nan if only NaNs changed.
    max_abs_delta: float | None
    #: Last step at which the tensor was verified equal to the baseline (the drift happened after it).
    last_clean_step: int
    #: The snapshot tagged ``drift`` that records it (None if the store could not write it).
    snapshot: str | None = None
    #: Under torch.distributed: the ranks that saw it move (empty in a single process).
    ranks: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def confirmed(self) -> bool:
        """Measured exactly against the baseline bytes (not only by checksum)."""
        return self.changed is not None

    def describe(self) -> str:
        what = "frozen parameter" if self.kind == "param" else "frozen buffer"
        alias = f" (also {', '.join(self.names[1:])})" if len(self.names) > 1 else ""
        when = f"at step {self.step}" if self.last_clean_step >= self.step - 1 else \
            f"between steps {self.last_clean_step} and {self.step}"
        if self.confirmed:
            delta = f"max |Δ| = {self.max_abs_delta:.6g}, {self.changed} of {self.numel} elements changed"
        elif self.ranks:
            delta = "bit checksum differs from the baseline (measured exactly by the rank that writes the history)"
        else:
            delta = "bit checksum differs from the baseline (baseline bytes unavailable for an exact comparison)"
        where = f", seen on {_ranks_text(self.ranks)}" if self.ranks else ""
        return f"{self.name}{alias} ({what}) moved {when}{where}: {delta}"

    def to_dict(self) -> dict[str, object]:
        mad = self.max_abs_delta
        return {"step": self.step, "names": list(self.names), "kind": self.kind, "numel": self.numel,
                "changed": self.changed,
                "max_abs_delta": None if mad is None else (mad if math.isfinite(mad) else str(mad)),
                "last_clean_step": self.last_clean_step, "snapshot": self.snapshot, "ranks": list(self.ranks)}


class FrozenDriftError(RuntimeError):
    """Raised from ``optimizer.step()`` (``on_drift="raise"``) at the first step a frozen tensor moved."""

    def __init__(self, events: Sequence[DriftEvent], step: int) -> None:
        self.events = list(events)
        self.step = step
        lines = [f"frozen tensors moved at step {step}:"] + [f"  {e.describe()}" for e in self.events[:12]]
        if len(self.events) > 12:
            lines.append(f"  ... and {len(self.events) - 12} more (see .events)")
        lines.append(hint_for(self.events))
        super().__init__("\n".join(x for x in lines if x))


@dataclass(frozen=True)
class ReplicaDivergence:
    """A frozen tensor whose bits differ between data-parallel replicas (``replica_check_every``).

    Each rank's own drift check compares a replica with its own baseline; a
    replica that was different from the start, or that moved in a way its
    check cannot see, shows only when the ranks compare notes.
    """

    step: int
    names: tuple[str, ...]
    #: Ranks grouped by identical bits, largest group first.
    groups: tuple[tuple[int, ...], ...]

    @property
    def name(self) -> str:
        return self.names[0]

    def describe(self) -> str:
        parts = " | ".join(_ranks_text(g) for g in self.groups)
        return f"{self.name} differs across replicas at step {self.step}: {parts} hold different bits"


class ReplicaDivergenceError(FrozenDriftError):
    """Raised on every rank (``on_drift="raise"``) when frozen replicas no longer agree."""

    def __init__(self, divergences: Sequence[ReplicaDivergence], step: int) -> None:
        self.events = []
        self.divergences = list(divergences)
        self.step = step
        lines = [f"frozen tensors differ across data-parallel replicas at step {step}:"]
        lines += [f"  {d.describe()}" for d in self.divergences[:12]]
        lines.append("  hint: every rank must start from the same weights (DDP broadcasts them when it wraps the "
                     "model) and freeze the same tensors")
        RuntimeError.__init__(self, "\n".join(lines))


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def hint_for(events: Sequence[DriftEvent]) -> str:
    """The usual cause of this kind of drift, for the message."""
    names = [n for e in events for n in e.names]
    if any(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in names):
        bn = "  hint: BatchNorm running statistics move in model.train(); call .eval() on frozen norm layers"
    else:
        bn = ""
    if any(e.kind == "param" for e in events):
        p = ("  hint: a frozen parameter moves when the optimizer still holds it (stale momentum, weight decay, "
             "a zero .grad); build the optimizer from trainable parameters only")
        return "\n".join(x for x in (bn, p) if x)
    return bn


def compare(baseline: TensorRef, current: TensorRef) -> tuple[int, float]:
    """(elements differing bitwise, max |Δ| in float64 over them) between two same-shape tensors."""
    if baseline.dtype != current.dtype or baseline.shape != current.shape:
        return current.numel, math.inf
    dt = current.dtype_info.np_dtype
    raw = np.dtype(f"u{dt.itemsize}")
    changed = 0
    worst = -1.0
    saw_nan = False
    for a, b in zip(baseline.chunks(_CHUNK), current.chunks(_CHUNK), strict=True):
        ua = np.frombuffer(a, dtype=raw)
        ub = np.frombuffer(b, dtype=raw)
        diff = ua != ub
        n = int(np.count_nonzero(diff))
        if not n:
            continue
        changed += n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fa = np.frombuffer(a, dtype=dt)[diff].astype(np.float64)
            fb = np.frombuffer(b, dtype=dt)[diff].astype(np.float64)
            d = np.abs(fb - fa)
        finite = d[~np.isnan(d)]
        if finite.size:
            worst = max(worst, float(finite.max()))
        if finite.size < d.size:
            saw_nan = True
    if changed and worst < 0:
        return changed, math.nan if saw_nan else 0.0
    return changed, max(worst, 0.0)


__all__ = ["DriftEvent", "FrozenDriftError", "ReplicaDivergence", "ReplicaDivergenceError", "compare", "hint_for"]
