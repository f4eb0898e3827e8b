"""The hook in the Hugging Face ``Trainer``: one callback gives a snapshot history and a drift alarm.

::

    from ckptdiff.integrations.transformers import CkptdiffCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[CkptdiffCallback(store="runs/bert", every=50)])
    trainer.train()

What the Trainer does, and how the callback follows it:

* The optimizer step is hooked, not the Trainer's events: the Trainer calls
  ``optimizer.step()`` once per gradient-accumulation cycle, so the history
  counts the same optimizer steps as ``state.global_step``, and a drift is
  caught inside the very step that causes it.
* ``start_step`` is ``state.global_step`` at ``on_train_begin``, which is
  after ``resume_from_checkpoint`` has restored the weights and the step: a
  resumed run continues the history where the checkpoint left it.
* The roles come from the live model and optimizer: a PEFT model's adapter
  weights (``requires_grad`` and in the optimizer) are trainable and the
  whole base model is checked for drift, with no manifest to write.
* ``logs`` from ``on_log`` become metrics of the snapshot at that step (on the
  world process zero; the hook itself writes only on rank 0).
* The Trainer has no exception event. A run that raised is closed by the
  next ``train()`` or at interpreter exit; :meth:`CkptdiffCallback.add_to`
  also wraps ``trainer.train`` so it is closed at once, with a snapshot
  tagged ``interrupted``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from transformers import TrainerCallback

from ._run import ManifestLike, TrackedRun


class CkptdiffCallback(TrainerCallback):
    """Tracks the Trainer's model and optimizer with :func:`ckptdiff.track`.

    Args:
        store: the snapshot store directory (created if missing).
        every: a snapshot every ``every`` optimizer steps (the drift check
            runs every ``check_every`` steps, by default each one).
        manifest: which tensors are meant to train: None to derive it from
            the model and optimizer; a :class:`ckptdiff.Manifest`, a manifest
            JSON file, or trainable glob patterns.
        on_drift: ``"warn"``, ``"raise"`` (stops training at the step a frozen
            tensor moves) or ``"record"``.
        **track_options: passed to :func:`ckptdiff.track` (``check_every``,
            ``on_store_error``, ...).

    After training, ``callback.tracker`` is the (closed) tracker of the last
    run: ``drift_events``, ``errors``, ``last_snapshot_id``.
    """

    def __init__(self, store: str | os.PathLike[str] = "runs/exp1", every: int = 100,
                 manifest: ManifestLike = None, on_drift: str = "warn", **track_options: Any) -> None:
        self._run = TrackedRun(store, every, manifest, on_drift, track_options)
        self._model: Any = None

    @property
    def tracker(self) -> Any:
        """The :class:`ckptdiff.Tracker` of the current (or last) run; None before the first."""
        return self._run.tracker

    def add_to(self, trainer: Any) -> CkptdiffCallback:
        """Add this callback to ``trainer`` and close the tracker at once if ``trainer.train()`` raises.

        Returns the callback, so ``cb = CkptdiffCallback(...).add_to(trainer)``
        keeps a handle on it.
        """
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        train = trainer.train
        if getattr(train, "_ckptdiff_callback", None) is self:
            return self
        run = self._run

        @functools.wraps(train)
        def train_closing_on_error(*args: Any, **kwargs: Any) -> Any:
            try:
                return train(*args, **kwargs)
            except BaseException as e:
                run.fail(e)
                raise

        train_closing_on_error._ckptdiff_callback = self  # type: ignore[attr-defined]
        trainer.train = train_closing_on_error
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if optimizer is None:  # created after this event (delayed creation): attach before the first update
            self._model = model
            return
        self._run.start(model, optimizer, state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> None:
        if self._model is not None:
            model, self._model = self._model, None
            self._run.start(model, optimizer, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            self._run.log(state.global_step, logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._model = None
        self._run.finish()


__all__ = ["CkptdiffCallback"]
