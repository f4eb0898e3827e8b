"""Do data-parallel replicas still hold the same frozen tensors? (every ``replica_check_every`` steps)

Each rank's drift check compares its replica with its own baseline, so a
replica that started different (weights loaded on rank 0 only, a rank that
froze other layers) or that moved where its check is blind is invisible to
it. Comparing the ranks' bit checksums of the frozen tensors (one int64 per
tensor, all-gathered) shows it. DTensor shards differ by design and are not
compared; each diverging tensor is reported once.
"""

from __future__ import annotations

from typing import Any

from .alerts import DriftWarning, warn
from .distributed import Collectives
from .drift import ReplicaDivergence, ReplicaDivergenceError
from .fingerprint import FrozenWatch, bit_checksum


class ReplicaCheck:
    """Periodic cross-rank comparison of the frozen, replicated tensors of one tracker."""

    def __init__(self, watch: FrozenWatch, comm: Collectives, every: int | None) -> None:
        self.watch = watch
        self.comm = comm
        self.every = every
        self.divergences: list[ReplicaDivergence] = []
        self._reported: set[int] = set()

    def due(self, steps: int) -> bool:
        return self.every is not None and steps % self.every == 0 and self.comm.ready

    def run(self, step: int) -> list[ReplicaDivergence]:
        """Compare checksums across ranks (a collective); the tensors newly found to differ."""
        import torch

        slots = self.watch.slots
        idx = [k for k, s in enumerate(slots)
               if not s.sharded and k not in self.watch.drifted and k not in self._reported]
        if not idx:
            return []
        sums = torch.stack([bit_checksum(slots[k].local).cpu() for k in idx])
        rows = self.comm.checksums_by_rank(sums)
        found = []
        for col, k in enumerate(idx):
            groups = _groups([row[col] for row in rows])
            if len(groups) > 1:
                self._reported.add(k)
                found.append(ReplicaDivergence(step, tuple(slots[k].names), groups))
        self.divergences.extend(found)
        return found


def act_on_divergence(found: list[ReplicaDivergence], step: int, on_drift: str) -> None:
    """Warn, raise (on every rank: they all computed the same ``found``) or only record."""
    if on_drift == "raise":
        raise ReplicaDivergenceError(found, step)
    if on_drift == "warn":
        lines = [f"ckptdiff: frozen tensors differ across data-parallel replicas at step {step}:"]
        warn(DriftWarning("\n".join(lines + [f"  {d.describe()}" for d in found[:12]])))


def _groups(values: list[Any]) -> tuple[tuple[int, ...], ...]:
    """Ranks grouped by equal value, largest group first (ties: lowest rank first)."""
    by_value: dict[Any, list[int]] = {}
    for rank, v in enumerate(values):
        by_value.setdefault(v, []).append(rank)
    return tuple(tuple(g) for g in sorted(by_value.values(), key=lambda g: (-len(g), g[0])))


__all__ = ["ReplicaCheck", "act_on_divergence"]
