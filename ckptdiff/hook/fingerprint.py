"""Cheap, on-device detection of frozen tensors that moved.

Two layers, chosen by measuring (see the README, "How the drift check stays cheap"):

1. **Version filter, every check.** PyTorch bumps a tensor's ``_version`` on
   every in-place write made through autograd-visible tensors (optimizer
   updates under ``no_grad``, ``copy_``, BatchNorm running-stat updates,
   ``load_state_dict``). Reading ``_version`` and ``data_ptr()`` is O(1) per
   tensor, touches no tensor memory and never syncs a GPU: ~0.1 µs a tensor.
   A bump does not prove a change (``p.add_(0)`` bumps too), so it only makes
   a tensor a *suspect*.
2. **Bit checksum, for suspects plus a rotating backstop.** The checksum is
   the wrapping integer sum of the tensor's bits (viewed as int64 where the
   size allows, else as the same-width int), computed where the tensor lives,
   batched into one small device tensor per device and one host read. Any
   single-element change, even one ulp, changes it. The backstop checksums
   1/``backstop_groups`` of the frozen bytes on every check, so writes the
   version counter cannot see (``p.data.add_()``, numpy views of CPU
   tensors, DLPack/C extensions) are still caught within one backstop cycle.

Blind spots, honestly: a change invisible to the version counter *and*
leaving the wrapping bit-sum unchanged (e.g. two elements swapped through
``.data``) goes unnoticed until a snapshot's content hash shows it;
parameters replaced by new objects after attach (``module.weight =
nn.Parameter(...)``) are re-resolved by the tracker only at snapshot time.

A checksum differing from the baseline only makes a *suspected* drift; the
tracker confirms it exactly against the baseline bytes in the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import Slot

_SAME_WIDTH_INT = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def bit_checksum(t: Any) -> Any:
    """A 0-d int64 tensor on ``t``'s device: the wrapping sum of ``t``'s bits as integers."""
    import torch

    x = t.detach()
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    nbytes = n * x.element_size()
    if x.is_contiguous() and nbytes % 8 == 0 and x.data_ptr() % 8 == 0:
        try:
            return x.reshape(-1).view(torch.int64).sum()
        except RuntimeError:
            pass  # a view the dtype cannot be reinterpreted from: take the same-width path
    ints = x.view(torch.int8) if x.dtype == torch.bool else x.view(getattr(torch, _SAME_WIDTH_INT[x.element_size()]))
    return ints.sum(dtype=torch.int64)


@dataclass
class Pending:
    """Checksums launched at ``step`` for ``indices``; read them with :meth:`FrozenWatch.collect`."""

    step: int
    indices: list[int]
    versions: list[tuple[int, int]]
    results: list[tuple[list[int], Any]]  # (positions into indices, device or host int64 tensor)
    events: list[Any] = field(default_factory=list)
    #: Indices whose version moved since the previous check, and that check's step: a drift among
    #: them happened after ``prev_step`` (the version counter saw no write before).
    version_suspects: frozenset[int] = frozenset()
    prev_step: int = 0


class FrozenWatch:
    """Watches a fixed set of frozen tensors against their state at attach time."""

    def __init__(self, slots: Sequence[Slot], *, backstop_groups: int = 1, owners: Sequence[str] | None = None,
                 always_bytes: int = 64 << 10, at_risk: Sequence[int] = ()) -> None:
        self.slots = list(slots)
        # Native kernels update some buffers without bumping _version (BatchNorm's running_mean/var on
        # CPU and CUDA, measured with torch 2.x), while num_batches_tracked beside them does bump: so a
        # suspect pulls in every watched tensor of the same module, and small frozen buffers are
        # checksummed on every check regardless.
        owners = list(owners) if owners is not None else [s.name.rpartition(".")[0] for s in self.slots]
        by_owner: dict[str, list[int]] = {}
        for i, o in enumerate(owners):
            by_owner.setdefault(o, []).append(i)
        self._siblings = [by_owner[o] for o in owners]
        # Fused optimizers (AdamW(fused=True)) write parameters without bumping _version either, so
        # frozen tensors the optimizer holds (``at_risk``: the audit's frozen-in-optimizer finding)
        # are checksummed on every check too. A clean setup has none, and pays nothing for this.
        risky = set(at_risk)
        self.always = [i for i, s in enumerate(self.slots)
                       if i in risky or (s.kind == "buffer" and s.nbytes <= always_bytes)]
        self.baseline: list[int] = []
        self._seen = [self._stamp(i) for i in range(len(self.slots))]
        self.drifted: set[int] = set()
        #: last step at which each tensor was verified equal to its baseline.
        self.last_clean: list[int] = [0] * len(self.slots)
        self.groups = _balance(self.slots, max(1, backstop_groups))
        self._cursor = 0
        self._last_launch_step = 0
        self.checksummed_bytes = 0

    def _stamp(self, i: int) -> tuple[int, int]:
        return self.slots[i].stamp()

    def set_baseline(self, step: int = 0) -> None:
        """Checksum every watched tensor now (at attach) as the reference."""
        self._seen = [self._stamp(i) for i in range(len(self.slots))]
        pending = self._launch(step, list(range(len(self.slots))), False)
        self.baseline = [0] * len(self.slots)
        for positions, res in pending.results:
            vals = res.tolist()
            for pos, v in zip(positions, vals):
                self.baseline[pending.indices[pos]] = int(v)
        self.last_clean = [step] * len(self.slots)
        self._last_launch_step = step

    def suspects(self) -> list[int]:
        """Tensors whose version or storage changed since they were last verified (O(1) each)."""
        seen = self._seen
        out = []
        for i, s in enumerate(self.slots):
            if s.stamp() != seen[i] and i not in self.drifted:
                out.append(i)
        return out

    def launch(self, step: int, *, backstop: bool = True, everything: bool = False, defer: bool = False
               ) -> Pending | None:
        """Start checksums of the suspects plus this turn's backstop group; None when nothing to check."""
        moved = self.suspects()
        if everything:
            idx = [i for i in range(len(self.slots)) if i not in self.drifted]
        else:
            idx = list(moved)
            chosen = set(idx)
            for i in list(idx):
                for j in self._siblings[i]:
                    if j not in chosen and j not in self.drifted:
                        chosen.add(j)
                        idx.append(j)
            for i in self.always:
                if i not in chosen and i not in self.drifted:
                    chosen.add(i)
                    idx.append(i)
            if backstop and self.groups:
                group = self.groups[self._cursor % len(self.groups)]
                self._cursor += 1
                idx += [i for i in group if i not in chosen and i not in self.drifted]
        prev, self._last_launch_step = self._last_launch_step, step
        if not idx:
            return None
        pending = self._launch(step, idx, defer)
        pending.version_suspects = frozenset(moved)
        pending.prev_step = prev
        return pending

    def _launch(self, step: int, idx: list[int], defer: bool) -> Pending:
        import torch

        versions = [self._stamp(i) for i in idx]
        by_device: dict[Any, list[int]] = {}
        for pos, i in enumerate(idx):
            by_device.setdefault(self.slots[i].local.device, []).append(pos)
        results = []
        events = []
        for device, positions in by_device.items():
            sums = torch.stack([bit_checksum(self.slots[idx[p]].local) for p in positions])
            self.checksummed_bytes += sum(self.slots[idx[p]].nbytes for p in positions)
            if device.type == "cuda" and defer:
                # Read it a check later: no host sync on the training thread.
                host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
                host.copy_(sums, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
                sums = host
            results.append((positions, sums))
        return Pending(step, idx, versions, results, events)

    def collect(self, pending: Pending) -> list[int]:
        """Read a launched check; return the indices whose checksum differs from the baseline."""
        for event in pending.events:
            event.synchronize()
        bad: list[int] = []
        for positions, res in pending.results:
            for pos, v in zip(positions, res.tolist()):
                i = pending.indices[pos]
                if i in self.drifted:
                    continue
                if int(v) == self.baseline[i]:
                    # Verified clean as of the launch: only a newer write makes it a suspect again.
                    self._seen[i] = pending.versions[pos]
                    self.last_clean[i] = pending.step
                else:
                    if i in pending.version_suspects:
                        self.last_clean[i] = max(self.last_clean[i], pending.prev_step)
                    bad.append(i)
        return bad

    def mark_drifted(self, i: int) -> None:
        """Stop checking a tensor already reported (one report per tensor, not one per step)."""
        self.drifted.add(i)

    def mark_clean(self, i: int, step: int) -> None:
        """A suspect the exact comparison cleared: re-base its checksum on what is there now."""
        self._seen[i] = self._stamp(i)
        self.last_clean[i] = step
        self.baseline[i] = int(bit_checksum(self.slots[i].local).item())


def _balance(slots: Sequence[Slot], k: int) -> list[list[int]]:
    """Split slot indices into k groups of about equal bytes (greedy, largest first)."""
    k = min(k, max(1, len(slots)))
    groups: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for i in sorted(range(len(slots)), key=lambda i: -slots[i].nbytes):
        j = min(range(k), key=load.__getitem__)
        groups[j].append(i)
        load[j] += slots[i].nbytes + 4096  # per-tensor overhead counts too
    return [sorted(g) for g in groups]


__all__ = ["FrozenWatch", "Pending", "bit_checksum"]
