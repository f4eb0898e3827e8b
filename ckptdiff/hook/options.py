"""The tracker's options, validated once at attach so a typo fails before the first step, not at step 10,000."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .metrics import METRICS_REDUCE
from .model import TrackerError

ON_DRIFT = ("warn", "raise", "record")
ON_STORE_ERROR = ("warn", "raise")


@dataclass(frozen=True)
class Options:
    """Everything :func:`ckptdiff.track` accepts besides the model and optimizer (see its docstring)."""

    store_path: str
    every: int = 100
    check_every: int = 1
    backstop_every: int = 100
    on_drift: str = "warn"
    on_store_error: str = "warn"
    start_step: int | None = None
    audit: bool = True
    rank0_only: bool = True
    replica_check_every: int | None = None
    metrics_reduce: str | None = None

    @classmethod
    def parse(cls, *, store: Any, every: Any, check_every: Any, backstop_every: Any, on_drift: Any,
              on_store_error: Any, start_step: Any, audit: Any, rank0_only: Any, replica_check_every: Any = None,
              metrics_reduce: Any = None) -> Options:
        """Validate the arguments as the user passed them; a TrackerError names the bad one."""
        every = _positive_int("every", every)
        if on_drift not in ON_DRIFT:
            raise TrackerError(f"on_drift must be one of {', '.join(ON_DRIFT)}, got {on_drift!r}")
        if on_store_error not in ON_STORE_ERROR:
            raise TrackerError(f"on_store_error must be one of {', '.join(ON_STORE_ERROR)}, got {on_store_error!r}")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)):
            raise TrackerError(f"start_step must be an integer, got {start_step!r}")
        if metrics_reduce not in METRICS_REDUCE:
            raise TrackerError(f"metrics_reduce must be None or 'mean', got {metrics_reduce!r}")
        if replica_check_every is not None:
            replica_check_every = _positive_int("replica_check_every", replica_check_every)
        return cls(store_path=_store_path(store), every=every, check_every=_positive_int("check_every", check_every),
                   backstop_every=_positive_int("backstop_every", every if backstop_every is None else backstop_every),
                   on_drift=on_drift, on_store_error=on_store_error, start_step=start_step, audit=bool(audit),
                   rank0_only=bool(rank0_only), replica_check_every=replica_check_every,
                   metrics_reduce=metrics_reduce)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TrackerError(f"{name} must be a positive integer, got {v!r}")
    return v


def _store_path(store: Any) -> str:
    if isinstance(store, (str, os.PathLike)):
        return os.fspath(store)
    root = getattr(store, "root", None)
    if not isinstance(root, str):
        raise TrackerError(f"store must be a directory path, got {type(store).__name__}")
    return root  # a Store object: the hook opens its own handle on its writer thread


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer to hook, or None; TrackerError for anything else.

    Wrappers (accelerate's ``AcceleratedOptimizer``, ...) keep the real one in
    ``.optimizer`` and call its ``step`` only when it really steps (gradient
    accumulation, skipped AMP steps): the inner one is the one to count.
    """
    import torch

    seen = 0
    while optimizer is not None and seen < 8 and isinstance(getattr(optimizer, "optimizer", None),
                                                             torch.optim.Optimizer):
        optimizer = optimizer.optimizer
        seen += 1
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TrackerError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; to audit a list of "
            "tensors before building an optimizer use ckptdiff.audit(model, tensors); without an optimizer "
            "pass optimizer=None and call tracker.step() after each update")
    return optimizer


__all__ = ["Options", "ON_DRIFT", "ON_STORE_ERROR", "inner_optimizer"]
