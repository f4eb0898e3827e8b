"""The hook in a Lightning ``Trainer``: one callback gives a snapshot history and a drift alarm.

::

    from ckptdiff.integrations.lightning import CkptdiffCallback

    trainer = lightning.pytorch.Trainer(max_steps=1000, callbacks=[CkptdiffCallback(store="runs/exp1", every=50)])
    trainer.fit(module, loader)

Works with ``lightning.pytorch`` and with the standalone ``pytorch_lightning``
package: the callback subclasses the ``Callback`` of each one installed, so
either ``Trainer`` takes it.

With one optimizer its ``step()`` is hooked, so snapshots and drift checks
happen per optimizer step (``accumulate_grad_batches`` batches make one) and
a drift is caught inside the step that causes it. With several optimizers
(GANs, manual optimization) the callback counts ``trainer.global_step``
instead and roles come from ``requires_grad``. The tracker attaches at the
first training batch, after the module's own ``on_train_epoch_start`` (where a
frozen backbone is put back in eval mode), with ``start_step`` =
``trainer.global_step``, which a ``ckpt_path`` resume has restored by then.
What the module logs with ``self.log`` (``trainer.callback_metrics``)
becomes metrics of the snapshot of the step it was logged at, on global rank
zero; the hook itself writes only on rank 0.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ._run import ManifestLike, TrackedRun


def _callback_bases() -> tuple[type, ...]:
    """``Callback`` of ``lightning.pytorch`` and of ``pytorch_lightning``, whichever are installed."""
    bases = []
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("ckptdiff.integrations.lightning needs Lightning: pip install lightning "
                          "(or pytorch-lightning)")
    return tuple(bases)


class CkptdiffCallback(*_callback_bases()):  # type: ignore[misc]
    """Tracks the LightningModule and its optimizer with :func:`ckptdiff.track`.

    Args:
        store: the snapshot store directory (created if missing).
        every: a snapshot every ``every`` optimizer steps.
        manifest: which tensors are meant to train: None to derive it from
            the module and optimizer; a :class:`ckptdiff.Manifest`, a
            manifest JSON file, or trainable glob patterns.
        on_drift: ``"warn"``, ``"raise"`` (stops training at the step a frozen
            tensor moves) or ``"record"``.
        **track_options: passed to :func:`ckptdiff.track`.

    After training, ``callback.tracker`` is the (closed) tracker of the last
    run: ``drift_events``, ``errors``, ``last_snapshot_id``.
    """

    def __init__(self, store: str | os.PathLike[str] = "runs/exp1", every: int = 100,
                 manifest: ManifestLike = None, on_drift: str = "warn", **track_options: Any) -> None:
        super().__init__()
        self._run = TrackedRun(store, every, manifest, on_drift, track_options)
        self._attach_pending = False
        self._count_steps = False  # no single optimizer to hook: count global steps here
        self._seen_step = 0

    @property
    def tracker(self) -> Any:
        """The :class:`ckptdiff.Tracker` of the current (or last) run; None before the first."""
        return self._run.tracker

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._attach_pending = True

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Attached here rather than in on_train_start: the module's own on_train_epoch_start (where a frozen
        # backbone is put back in eval mode) has run, so the audit sees the model as it really trains.
        if not self._attach_pending:
            return
        self._attach_pending = False
        optimizers = list(trainer.optimizers)
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        self._count_steps = optimizer is None
        self._seen_step = trainer.global_step
        self._run.start(pl_module, optimizer, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._run.open or step == self._seen_step:
            return  # a batch inside an accumulation cycle: no update, and its loss is not a step's
        if self._count_steps:
            for _ in range(step - self._seen_step):
                self._run.tracker.step()
        self._seen_step = step
        if trainer.is_global_zero:
            self._run.log(step, trainer.callback_metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._attach_pending = False
        self._run.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._attach_pending = False
        self._run.fail(exception)


__all__ = ["CkptdiffCallback"]
