"""Metrics the loop logs (loss, lr, ...), handed to the snapshot of the step they belong to.

A snapshot is captured inside ``optimizer.step()``, but loops log that step's
loss *after* it; so a snapshot's metrics are sealed only when the next step
begins (or on snapshot/flush/close), and its write waits for them, at most
:data:`SEAL_TIMEOUT_S`, so a loop that stops stepping (a long evaluation, a
hang, a pre-emption coming) still gets the snapshot on disk; metrics logged
after that go to the next snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from .model import TrackerError

#: A snapshot waits at most this long for its step's metrics before it is written without them.
SEAL_TIMEOUT_S = 10.0


class MetricsSeal:
    """The metrics of one snapshot, handed from the training thread to the writer exactly once."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.expired = False
        self.metrics: dict[str, Any] = {}

    def take(self) -> dict[str, Any]:
        """Writer thread: the sealed metrics as plain numbers, or none after the timeout."""
        self.ready.wait(SEAL_TIMEOUT_S)
        with self.lock:
            if not self.ready.is_set():
                self.expired = True
            return to_numbers(self.metrics)


class MetricsLog:
    """What was logged since the last snapshot, and the snapshot waiting for it."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._step: int | None = None
        self._open: MetricsSeal | None = None

    @property
    def waiting(self) -> bool:
        """A snapshot waits for this step's metrics."""
        return self._open is not None

    def log(self, step: int | None, metrics: Mapping[str, Any]) -> None:
        """Validate and keep ``metrics`` (the latest value of each name wins)."""
        import torch

        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise TrackerError(f"metric {k!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
                v = v.detach()  # converted on the writer thread: logging a CUDA loss does not sync the GPU
            elif isinstance(v, bool):
                v = int(v)
            elif not isinstance(v, (int, float, str)) and not hasattr(v, "item"):
                raise TrackerError(f"metric {k!r} must be a number, a string or a scalar tensor, "
                                   f"got {type(v).__name__}")
            self._values[k] = v
        if step is not None:
            self._step = int(step)

    def open_seal(self) -> MetricsSeal:
        """A snapshot was captured: it will take what is logged until :meth:`seal`."""
        seal = self._open = MetricsSeal()
        return seal

    def seal(self, current_step: int) -> None:
        """Hand the metrics logged so far to the snapshot waiting for them, if any."""
        seal, self._open = self._open, None
        if seal is None:
            return
        with seal.lock:
            if seal.expired:
                return  # written without them (the loop paused): they go to the next snapshot instead
            seal.metrics = self._take(current_step)
            seal.ready.set()

    def _take(self, current_step: int) -> dict[str, Any]:
        metrics, self._values = self._values, {}
        if self._step is not None:
            if self._step != current_step:
                metrics["metrics_step"] = self._step
            self._step = None
        return metrics


def to_numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar tensors to Python numbers (on the writer thread: a CUDA scalar syncs it, not training)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and not isinstance(v, (int, float, str)):
            v = v.item()
        out[k] = v
    return out


__all__ = ["MetricsLog", "MetricsSeal", "SEAL_TIMEOUT_S", "to_numbers"]
