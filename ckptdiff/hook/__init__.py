"""The training hook: one line in a fine-tuning loop gives an audit, a snapshot history and live drift alarms.

::

    tracker = ckptdiff.track(model, optimizer, store="runs/exp1", every=100)

At attach the hook audits the optimizer (:mod:`.audit`), derives the
trainable/frozen/buffer manifest (:mod:`.model`), records a full,
deduplicated baseline snapshot with that manifest, and fingerprints the
frozen tensors where they live (:mod:`.fingerprint`). It then runs after
every ``optimizer.step()`` (the optimizer's step post-hook; without an
optimizer, call :meth:`Tracker.step`):

* every ``check_every`` steps: the cheap frozen-drift check. A suspect is
  confirmed exactly against the baseline bytes, recorded as a snapshot tagged
  ``drift`` and reported once per tensor (warn, raise or record);
* every ``every`` steps: a snapshot of the trainable tensors and of anything
  else that changed; the rest is inherited from the previous snapshot, so the
  store holds one model plus what moved.

Snapshot bytes are copied to (pinned, reused) host buffers on the training
thread and hashed and written by one background thread with at most one
snapshot in flight (:mod:`.writer`). A store failure is recorded in
:attr:`Tracker.errors` and warned about, never raised into the training loop
unless ``on_store_error="raise"``. :mod:`.tracker` says where each part lives;
under torch.distributed the hook runs on every rank (:mod:`.distributed`).

torch is imported only inside this package's functions, never by
``import ckptdiff`` nor by ``import ckptdiff.hook``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from .alerts import AuditWarning, DriftWarning, StaleWarning, StoreWarning
from .audit import AuditFinding, AuditReport, run_audit
from .drift import DriftEvent, FrozenDriftError, ReplicaDivergence, ReplicaDivergenceError
from .lifecycle import open_tracker
from .model import TrackerError
from .tracker import Tracker


def audit(model: Any = None, optimizer: Any = None, *, trainable: str | Sequence[str] | None = None,
          print_report: bool = False) -> AuditReport:
    """Audit a model against its optimizer, or against the tensors you are about to give one.

    ``optimizer`` may be a ``torch.optim.Optimizer``, a list of tensors or of
    param-group dicts, ``named_parameters()`` pairs, or a ``{name: tensor}``
    mapping (e.g. the state_dict entries you plan to train). Use the latter
    *before* constructing the optimizer: torch refuses non-leaf tensors with
    "can't optimize a non-leaf Tensor", and this names them and the fix.
    """
    report = run_audit(model, optimizer, trainable=trainable)
    if print_report:
        print(report, file=sys.stderr)
    return report


def track(model: Any, optimizer: Any = None, store: str | os.PathLike[str] = "runs/exp1", every: int = 100,
          trainable: str | Sequence[str] | None = None, on_drift: str = "warn", check_every: int = 1,
          **options: Any) -> Tracker:
    """Attach a :class:`Tracker` to ``model`` (and ``optimizer``); see the module docstring.

    Args:
        model: the ``torch.nn.Module`` (DDP, DataParallel, ``torch.compile`` and FSDP2 models as they are).
        optimizer: a ``torch.optim.Optimizer``, or a wrapper holding one in ``.optimizer`` (accelerate).
        store: the snapshot store directory; ``{rank}`` in it is replaced by the rank.
        every: a snapshot every this many steps.
        trainable: glob pattern(s) naming the trainable tensors (default: what the optimizer updates).
        on_drift: ``"warn"``, ``"raise"`` (``FrozenDriftError`` from ``optimizer.step()``, on every rank
            together under torch.distributed) or ``"record"``.
        check_every: the drift check every this many steps.
        **options: ``backstop_every``, ``start_step``, ``on_store_error`` (``"warn"``/``"raise"``),
            ``audit``, ``rank0_only`` (default True: rank 0 writes; False needs ``{rank}`` in ``store``),
            ``replica_check_every`` (compare frozen replicas across ranks every N steps),
            ``metrics_reduce`` (None: rank 0's metrics; ``"mean"``: averaged over ranks).

    Returns:
        The attached :class:`Tracker`; close it (or use it as a context manager) when training ends.
    """
    return Tracker(model, optimizer, store=store, every=every, trainable=trainable, on_drift=on_drift,
                   check_every=check_every, **options)


__all__ = ["track", "audit", "open_tracker", "Tracker", "FrozenDriftError", "DriftEvent", "AuditFinding",
           "AuditReport", "DriftWarning", "AuditWarning", "StoreWarning", "StaleWarning", "TrackerError",
           "ReplicaDivergence", "ReplicaDivergenceError"]
