"""Stale trainable tensors: meant to train, still bitwise equal to the baseline after a whole interval.

The usual causes are a tensor cut off from the loss, ``requires_grad=False``
by mistake, a learning rate of 0, or a tensor left out of the optimizer. It
is found from the content hashes the store already computed, so it costs no
tensor read; once a tensor moved it is never looked at again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .model import names_of

#: Trainable tensors are called stale only after this many updates (and at least one ``every`` interval):
#: zero-initialised chains get their first gradient only after a step (LoRA's ``A`` while ``B`` is still
#: zero), which is not staleness.
STALE_MIN_STEPS = 5


class StaleFinder:
    """Trainable tensors not yet seen moved; each is reported stale at most once."""

    def __init__(self, trainable: Sequence[str], *, every: int, start_step: int) -> None:
        self.trainable = list(trainable)
        self.min_steps = max(every, STALE_MIN_STEPS)
        self.start_step = start_step
        self.stale: list[str] = []
        self._moved: set[str] = set()

    def find(self, store: Any, sid: str, step: int, baseline_hashes: Mapping[str, str]) -> str | None:
        """Writer thread: a message naming the newly stale tensors of snapshot ``sid``, or None."""
        if not baseline_hashes or step - self.start_step < self.min_steps:
            return None
        todo = [n for n in self.trainable if n not in self.stale and n not in self._moved]
        if not todo:
            return None  # every trainable tensor has moved (once moved, never "still equal"): no store read
        entries = store.entries(sid)
        stale = []
        for name in todo:
            if name not in entries:
                continue
            if entries[name].hash == baseline_hashes.get(name):
                stale.append(name)
            else:
                self._moved.add(name)
        if not stale:
            return None
        self.stale.extend(stale)
        return (f"{len(stale)} trainable tensor(s) are still bitwise equal to the baseline at step {step}: "
                f"{names_of(stale)}; check that they get gradients (connected to the loss, requires_grad=True), "
                "that their learning rate is not 0, and that they are in the optimizer")


__all__ = ["StaleFinder", "STALE_MIN_STEPS"]
