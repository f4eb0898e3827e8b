"""A tracker's life outside the training loop: one per model, closed at exit, stopped when forgotten.

* One open tracker per model (and per optimizer): a second ``track()`` of the
  same model would count every step twice and race its own history, so it is
  refused while the first is open (:func:`open_tracker` finds the first one
  for a notebook cell re-run after its handle was lost).
* A script that forgets ``close()`` still gets its last snapshot: an
  ``atexit`` handler closes the tracker (held weakly, so it keeps nothing alive).
* A tracker that becomes unreachable unclosed stops its writer thread from a
  ``weakref.finalize`` callback, which never blocks (gc may run on any thread).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .model import TrackerError, unwrap

#: Open trackers by the id of the model or optimizer they watch (values held weakly).
_OPEN: dict[int, weakref.ref[Any]] = {}
_OPEN_LOCK = threading.RLock()  # re-entrant: a finalizer run by gc may need it while this thread holds it


def _alive(ref: weakref.ref[Any] | None) -> Any:
    tracker = ref() if ref is not None else None
    return tracker if tracker is not None and not tracker.closed else None


def open_tracker(model: Any) -> Any:
    """The open tracker watching ``model`` (or ``model`` as an optimizer), if any.

    For a notebook cell re-run after its tracker handle was lost:
    ``ckptdiff.hook.open_tracker(model).close()`` before tracking again.
    """
    keys = [id(model)]
    try:
        keys.append(id(unwrap(model)))
    except Exception:  # noqa: BLE001 - not a module: an optimizer, or anything else
        pass
    with _OPEN_LOCK:
        for key in keys:
            tracker = _alive(_OPEN.get(key))
            if tracker is not None:
                return tracker
    return None


def claim(tracker: Any, module: Any, optimizer: Any) -> list[int]:
    """Register ``tracker`` for its model and optimizer; TrackerError if another open one has either."""
    keys = [id(module)] + ([id(optimizer)] if optimizer is not None else [])
    with _OPEN_LOCK:
        for key in keys:
            other = _alive(_OPEN.get(key))
            if other is not None:
                what = "model" if key == keys[0] else "optimizer"
                raise TrackerError(
                    f"this {what} is already tracked by {other!r}; call close() on that tracker (or leave "
                    "its `with` block; ckptdiff.hook.open_tracker(model) finds it) before tracking it again: "
                    "two trackers would count every step twice")
        ref = weakref.ref(tracker)
        for key in keys:
            _OPEN[key] = ref
    return keys


def release(tracker: Any, keys: Sequence[int]) -> None:
    """Forget ``tracker``'s registrations (and any left by trackers already collected)."""
    with _OPEN_LOCK:
        for key in keys:
            ref = _OPEN.get(key)
            if ref is not None and ref() in (tracker, None):
                del _OPEN[key]


class AtExit:
    """Close a tracker the script forgot to close, at interpreter exit (without raising)."""

    def __init__(self, tracker: Any) -> None:
        self._ref = weakref.ref(tracker)

    def __call__(self) -> None:
        tracker = self._ref()
        if tracker is not None:
            try:
                tracker._close(raise_drift=False, collective=False)  # other ranks may be gone already
            except Exception:  # noqa: BLE001 - never fail interpreter exit
                pass


class Lifeline:
    """The exit handler and the finalizer of one tracker, installed and removed together."""

    def __init__(self, tracker: Any, stop: Callable[[], None], keys: Sequence[int]) -> None:
        self._at_exit = AtExit(tracker)
        atexit.register(self._at_exit)
        self._finalizer = weakref.finalize(tracker, _collected, stop, self._at_exit, list(keys))
        self._finalizer.atexit = False  # interpreter exit is AtExit's job: it can still write the last snapshot

    def detach(self) -> None:
        """The tracker is closing by itself: neither handler is needed any more."""
        atexit.unregister(self._at_exit)
        self._finalizer.detach()


def _collected(stop: Callable[[], None], at_exit: AtExit, keys: Sequence[int]) -> None:
    """A tracker was garbage-collected unclosed: stop its thread (never blocks)."""
    stop()
    atexit.unregister(at_exit)
    release(None, keys)


def weak_callback(method: Any) -> Callable[..., None]:
    """``method`` called through a weak reference: the writer thread must not keep the tracker alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        m = ref()
        if m is not None:
            m(*args)
    return call


__all__ = ["open_tracker", "claim", "release", "Lifeline", "weak_callback"]
