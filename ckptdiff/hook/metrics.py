"""Metrics the loop logs (loss, lr, ...), handed to the snapshot of the step they belong to.

A snapshot is captured inside ``optimizer.step()``, but loops log that step's
loss *after* it; so a snapshot's metrics are sealed only when the next step
begins (or on snapshot/flush/close), and its write waits for them, at most
:data:`SEAL_TIMEOUT_S`, so a loop that stops stepping (a long evaluation, a
hang, a pre-emption coming) still gets the snapshot on disk; metrics logged
after that go to the next snapshot.

Under torch.distributed the values are one rank's own (the rank that writes
the history), and each snapshot says so (``metrics_rank``); with
``metrics_reduce="mean"`` every rank's values are averaged when they are
sealed (``metrics_mean_of_ranks`` says over how many), which makes sealing
a collective: every rank seals at the same points, since snapshots are
taken at the same steps on every rank.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from .distributed import Collectives
from .model import TrackerError

METRICS_REDUCE = (None, "mean")

#: A snapshot waits at most this long for its step's metrics before it is written without them.
SEAL_TIMEOUT_S = 10.0


class MetricsSeal:
    """The metrics of one snapshot, handed from the training thread to the writer exactly once."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.expired = False
        self.metrics: dict[str, Any] = {}

    def expire(self) -> None:
        """No snapshot will take these metrics: they stay for the next one."""
        with self.lock:
            self.expired = True

    def take(self) -> dict[str, Any]:
        """Writer thread: the sealed metrics as plain numbers, or none after the timeout."""
        self.ready.wait(SEAL_TIMEOUT_S)
        with self.lock:
            if not self.ready.is_set():
                self.expired = True
            return to_numbers(self.metrics)


class MetricsLog:
    """What was logged since the last snapshot, and the snapshot waiting for it."""

    def __init__(self, comm: Collectives | None = None, reduce: str | None = None) -> None:
        self._values: dict[str, Any] = {}
        self._step: int | None = None
        self._open: MetricsSeal | None = None
        self._comm = comm
        self._reduce = reduce

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
        comm = self._comm
        if self._reduce == "mean" and comm is not None and comm.ready:
            self._values = _mean(comm.objects(to_numbers(self._values)))  # every rank, expired or not
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
        comm = self._comm
        if metrics and comm is not None and comm.ranks.world > 1:
            if self._reduce == "mean" and comm.ready:
                metrics["metrics_mean_of_ranks"] = comm.ranks.world
            else:
                metrics["metrics_rank"] = comm.ranks.rank
        return metrics


def _mean(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric metric averaged over the ranks that logged it; anything else as the first rank has it."""
    out: dict[str, Any] = {}
    for values in per_rank:
        for k, v in values.items():
            out.setdefault(k, v)
    for k in out:
        nums = [d[k] for d in per_rank if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)]
        if nums and len(nums) == sum(k in d for d in per_rank):
            out[k] = sum(nums) / len(nums)
    return out


def to_numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar tensors to Python numbers (on the writer thread: a CUDA scalar syncs it, not training)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and not isinstance(v, (int, float, str)):
            v = v.item()
        out[k] = v
    return out


__all__ = ["MetricsLog", "MetricsSeal", "METRICS_REDUCE", "SEAL_TIMEOUT_S", "to_numbers"]
