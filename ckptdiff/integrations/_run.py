"""One training run's tracker, as a framework callback drives it.

The framework callbacks differ only in *when* they are called and where the
model, optimizer, step and logs come from; what happens at each moment is the
same everywhere and lives here: attach (closing a tracker a failed earlier
run left open), record logged values as snapshot metrics, tag the final
snapshot and close, or record an interrupted run and close without hiding the
exception that stopped it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..hook import TrackerError
from ..manifest import Manifest

#: What ``manifest=`` may be: a Manifest, a manifest JSON file, or trainable glob patterns.
ManifestLike = Manifest | str | os.PathLike[str] | Sequence[str] | None


def trainable_names(manifest: ManifestLike, model: Any) -> str | list[str] | None:
    """The hook's ``trainable=`` for a user's ``manifest=`` (None: derive it from the model and optimizer).

    Patterns pass through (the hook refuses one that matches nothing). A
    Manifest or manifest file is resolved against the model's parameter names
    with the manifest's own rules (most specific pattern wins, frozen on a
    tie), so a ``frozen`` exception inside a ``trainable`` glob stays frozen.
    Where it says nothing (a name no pattern matches when both ``trainable``
    and ``frozen`` are listed), the live model decides: ``requires_grad``.
    """
    if manifest is None:
        return None
    if isinstance(manifest, os.PathLike) or (isinstance(manifest, str) and os.path.isfile(manifest)):
        manifest = Manifest.load(manifest)
    if not isinstance(manifest, Manifest):
        return manifest if isinstance(manifest, str) else list(manifest)
    names = [n for n, p in model.named_parameters(remove_duplicate=False)
             if manifest.role(n) == "trainable" or (manifest.role(n) == "unknown" and p.requires_grad)]
    if not names:
        raise TrackerError(f"the manifest ({manifest.source or 'given'}) calls every parameter of the model "
                           f"frozen: nothing would train (trainable patterns: {list(manifest.trainable)})")
    return names


def scalar_metrics(logs: Mapping[str, Any]) -> dict[str, Any]:
    """The loggable values of a framework's log dict: numbers, strings and one-element tensors.

    Frameworks log other things beside the scalars (lists, nested dicts,
    ``None``); a snapshot's metrics are scalars, so those are left out rather
    than failing the training step that logged them.
    """
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if not isinstance(key, str) or value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif hasattr(value, "item"):  # torch / numpy scalars; a tensor of several values is not a metric
            size = value.numel() if hasattr(value, "numel") else getattr(value, "size", None)
            if size == 1:
                out[key] = value
    return out


class TrackedRun:
    """Holds the options until the framework hands over the model, then the tracker of one run.

    ``tracker`` is kept after the run ends (closed), so ``drift_events``,
    ``errors`` and ``last_snapshot_id`` can be read once training returns.
    """

    def __init__(self, store: str | os.PathLike[str], every: int, manifest: ManifestLike, on_drift: str,
                 options: Mapping[str, Any]) -> None:
        if manifest is not None and "trainable" in options:
            raise TypeError("pass either manifest= or trainable=, not both (they say the same thing)")
        self.store = store
        self.every = every
        self.manifest = manifest
        self.on_drift = on_drift
        self.options = dict(options)
        self.tracker: Any = None
        self._open = False

    @property
    def open(self) -> bool:
        return self._open

    def start(self, model: Any, optimizer: Any, start_step: int) -> None:
        """Attach to ``model`` and ``optimizer``; history steps continue from ``start_step``."""
        import ckptdiff

        self._close_leftover()
        options = dict(self.options)
        if self.manifest is not None:
            options["trainable"] = trainable_names(self.manifest, model)
        self.tracker = ckptdiff.track(model, optimizer, store=self.store, every=self.every,
                                      on_drift=self.on_drift, start_step=start_step, **options)
        self._open = True

    def log(self, step: int, logs: Mapping[str, Any]) -> None:
        """Record ``logs`` (measured at framework step ``step``) as metrics of the snapshot at this step."""
        if self._open:
            metrics = scalar_metrics(logs)
            if metrics:
                self.tracker.log(step=step, **metrics)

    def finish(self) -> None:
        """The run ended normally: a snapshot tagged ``final``, then close (final full drift check)."""
        if not self._open:
            return
        self._open = False
        tracker = self.tracker
        try:
            tracker.snapshot(tag="final", message=f"end of training at step {tracker.current_step}")
        finally:
            tracker.close()

    def fail(self, exc: BaseException) -> None:
        """The run stopped on ``exc``: record where it was (tag ``interrupted``) and close, never raising."""
        if not self._open:
            return
        self._open = False
        tracker = self.tracker
        try:
            tracker.snapshot(tag="interrupted", message=f"training stopped by {type(exc).__name__} at step "
                                                        f"{tracker.current_step}")
        except Exception:  # noqa: BLE001 - the training's own exception is the one that must propagate
            pass
        tracker.__exit__(type(exc), exc, exc.__traceback__)  # closes; records, never raises, its own failures

    def _close_leftover(self) -> None:
        """An earlier run of this callback raised where no hook told us (its tracker still holds the model)."""
        if self._open:
            self.fail(RuntimeError("a new training run started before the previous one ended"))
