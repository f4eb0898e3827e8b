"""The training hook: one line in a fine-tuning loop gives an audit, a snapshot history and live drift alarms.

::

    tracker = ckptdiff.track(model, optimizer, store="runs/exp1", every=100)

At attach the hook audits the optimizer (:mod:`ckptdiff.hook_audit`),
derives the trainable/frozen/buffer manifest (:mod:`ckptdiff.hook_model`),
records a full, deduplicated baseline snapshot with that manifest, and
fingerprints the frozen tensors where they live
(:mod:`ckptdiff.hook_fingerprint`). It then runs after every
``optimizer.step()`` (the optimizer's step post-hook; without an optimizer,
call :meth:`Tracker.step`):

* every ``check_every`` steps: the cheap frozen-drift check. A suspect is
  confirmed exactly against the baseline bytes, recorded as a snapshot tagged
  ``drift`` and reported once per tensor (warn, raise or record);
* every ``every`` steps: a snapshot of the trainable tensors and of anything
  else that changed; the rest is inherited from the previous snapshot, so the
  store holds one model plus what moved.

Snapshot bytes are copied to (pinned, reused) host buffers on the training
thread and hashed and written by one background thread with at most one
snapshot in flight (:mod:`ckptdiff.hook_writer`). A store failure is
recorded in :attr:`Tracker.errors` and warned about, never raised into the
training loop unless ``on_store_error="raise"``.

torch is imported only inside this module's functions and its ``hook_*``
helpers, never by ``import ckptdiff``.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import CkptError
from .hook_audit import AuditFinding, AuditReport, run_audit
from .hook_capture import Capture, HostStaging, stream_refs
from .hook_drift import (
    AuditWarning,
    DriftEvent,
    DriftWarning,
    FrozenDriftError,
    StaleWarning,
    StoreWarning,
    compare,
    hint_for,
)
from .hook_fingerprint import FrozenWatch, Pending
from .hook_model import ModelTensors, TrackerError, _check_tensor, collect, names_of, optimizer_tensor_ids
from .hook_writer import BackgroundWriter

ON_DRIFT = ("warn", "raise", "record")
_WARN_LINES = 12
ON_STORE_ERROR = ("warn", "raise")
#: Trainable tensors are called stale only after this many updates (and at least one ``every`` interval).
_STALE_MIN_STEPS = 5
#: ``tracker.errors`` keeps this many messages (a store that fails every step must not grow a list forever).
_MAX_ERRORS = 100

#: Open trackers by the id of the model they watch (values held weakly): a second ``track()`` of the same
#: model would double-count its steps and race its own history, so it is refused while the first is open.
_OPEN: dict[int, weakref.ref[Any]] = {}
_OPEN_LOCK = threading.RLock()  # re-entrant: a finalizer run by gc may need it while this thread holds it


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
        import sys
        print(report, file=sys.stderr)
    return report


def track(model: Any, optimizer: Any = None, store: str | os.PathLike[str] = "runs/exp1", every: int = 100,
          trainable: str | Sequence[str] | None = None, on_drift: str = "warn", check_every: int = 1,
          **options: Any) -> Tracker:
    """Attach a :class:`Tracker` to ``model`` (and ``optimizer``); see the module docstring."""
    return Tracker(model, optimizer, store=store, every=every, trainable=trainable, on_drift=on_drift,
                   check_every=check_every, **options)


def open_tracker(model: Any) -> Tracker | None:
    """The open tracker watching ``model`` (or ``model`` as an optimizer), if any.

    For a notebook cell re-run after its tracker handle was lost:
    ``ckptdiff.hook.open_tracker(model).close()`` before tracking again.
    """
    from .hook_model import unwrap

    keys = [id(model)]
    try:
        keys.append(id(unwrap(model)))
    except Exception:  # noqa: BLE001 - not a module: an optimizer, or anything else
        pass
    with _OPEN_LOCK:
        for key in keys:
            ref = _OPEN.get(key)
            tracker = ref() if ref is not None else None
            if tracker is not None and not tracker._closed:
                return tracker
    return None


def _warn(warning: Warning) -> None:
    """Warn at the user's line (their optimizer.step() or track() call), not inside torch or ckptdiff."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    level = 1
    frame = sys._getframe(1)
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not (fname.startswith(here + os.sep) or f"{os.sep}torch{os.sep}" in fname):
            break
        frame = frame.f_back
        level += 1
    warnings.warn(warning, stacklevel=level + 1)


def _dist_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TrackerError(f"{name} must be a positive integer, got {v!r}")
    return v


class Tracker:
    """Watches one model (and optimizer) during training. Create it with :func:`track`.

    Public state: ``manifest`` (derived roles), ``audit_report``,
    ``drift_events`` (every confirmed drift), ``errors`` (store failures, as
    strings), ``baseline_id``, ``current_step``, ``stats``.
    """

    def __init__(self, model: Any, optimizer: Any = None, *, store: str | os.PathLike[str] = "runs/exp1",
                 every: int = 100, trainable: str | Sequence[str] | None = None, on_drift: str = "warn",
                 check_every: int = 1, backstop_every: int | None = None, start_step: int | None = None,
                 on_store_error: str = "warn", audit: bool = True, rank0_only: bool = True) -> None:
        import torch

        self.every = _positive_int("every", every)
        self.check_every = _positive_int("check_every", check_every)
        self.backstop_every = _positive_int("backstop_every", backstop_every if backstop_every is not None
                                            else self.every)
        if on_drift not in ON_DRIFT:
            raise TrackerError(f"on_drift must be one of {', '.join(ON_DRIFT)}, got {on_drift!r}")
        if on_store_error not in ON_STORE_ERROR:
            raise TrackerError(f"on_store_error must be one of {', '.join(ON_STORE_ERROR)}, got {on_store_error!r}")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)):
            raise TrackerError(f"start_step must be an integer, got {start_step!r}")
        # Wrappers (accelerate's AcceleratedOptimizer, ...) call the inner optimizer's step only when it
        # really steps (gradient accumulation, skipped AMP steps): hook the inner one.
        while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TrackerError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; to audit a list of "
                "tensors before building an optimizer use ckptdiff.audit(model, tensors); without an optimizer "
                "pass optimizer=None and call tracker.step() after each update")
        if isinstance(store, (str, os.PathLike)):
            self.store_path = os.fspath(store)
        else:
            root = getattr(store, "root", None)
            if not isinstance(root, str):
                raise TrackerError(f"store must be a directory path, got {type(store).__name__}")
            self.store_path = root  # a Store object: the hook opens its own handle on its writer thread
        self.on_drift = on_drift
        self.on_store_error = on_store_error
        self.model = model
        self.optimizer = optimizer
        self.errors: list[str] = []
        self.store_failures = 0  # all of them; ``errors`` keeps the first _MAX_ERRORS messages
        self._failing = False  # in a streak of store failures: warned at its first, quiet until a success
        self._quiet_failures = 0
        self.drift_events: list[DriftEvent] = []
        self.stale: list[str] = []
        self._moved: set[str] = set()  # trainable tensors seen different from the baseline
        self.steps = 0
        self.start_step = 0
        self.baseline_id: str | None = None
        self.last_snapshot_id: str | None = None
        self.resumed = False
        self._closed = False
        self._handles: list[Any] = []
        self._metrics: dict[str, Any] = {}
        self._metrics_step: int | None = None
        self._err_lock = threading.Lock()
        self._unreported: list[str] = []
        self._pending: Pending | None = None
        self._open_seal: _MetricsSeal | None = None
        self._param_wait: list[tuple[Any, Any]] = []
        self._hook_s = 0.0
        self._snapshots_written = 0
        self._last_snapshot_steps = 0
        self._written_step: int | None = None  # step of the last snapshot the store accepted

        rank, _world = _dist_rank()
        self.active = not (rank0_only and rank != 0)
        opt_ids = optimizer_tensor_ids(optimizer) if optimizer is not None else None
        self.tensors: ModelTensors = collect(model, optimizer_ids=opt_ids, trainable=trainable)
        self._claim()
        try:
            self._init_rest(audit, trainable, start_step)
        except BaseException:
            self._release()
            raise

    def _claim(self) -> None:
        """Refuse a second open tracker on the same model (or the same optimizer)."""
        keys = [id(self.tensors.module)] + ([id(self.optimizer)] if self.optimizer is not None else [])
        with _OPEN_LOCK:
            for key in keys:
                other = _OPEN.get(key)
                other = other() if other is not None else None
                if other is not None and not other._closed:
                    what = "model" if key == keys[0] else "optimizer"
                    raise TrackerError(
                        f"this {what} is already tracked by {other!r}; call close() on that tracker (or leave "
                        "its `with` block; ckptdiff.hook.open_tracker(model) finds it) before tracking it again: "
                        "two trackers would count every step twice")
            ref = weakref.ref(self)
            self._keys = keys
            for key in keys:
                _OPEN[key] = ref

    def _release(self) -> None:
        with _OPEN_LOCK:
            for key in getattr(self, "_keys", ()):
                ref = _OPEN.get(key)
                if ref is not None and ref() in (self, None):
                    del _OPEN[key]

    def _init_rest(self, audit: bool, trainable: Any, start_step: int | None) -> None:
        model, optimizer, on_drift = self.model, self.optimizer, self.on_drift
        self.manifest = self.tensors.manifest()
        self.audit_report = (run_audit(model, optimizer, trainable=trainable, tensors=self.tensors)
                             if audit and self.active else AuditReport())
        if self.audit_report.errors:
            raise TrackerError("cannot track this optimizer:\n" + str(self.audit_report))
        for finding in self.audit_report.warnings:
            _warn(AuditWarning(str(finding)))
        if not self.active:
            return  # another rank writes the history; this one only counts steps

        slots = self.tensors.slots
        self._frozen_idx = [i for i, s in enumerate(slots) if s.role == "frozen"]
        self._trainable_idx = [i for i, s in enumerate(slots) if s.role == "trainable"]
        self._cuda = any(s.tensor.device.type == "cuda" for s in slots)
        self._defer_checks = self._cuda and on_drift != "raise"
        self._staging = HostStaging()

        from .store import Store

        path = self.store_path

        def open_store() -> Any:
            store = Store.open(path, create=True)
            if getattr(store, "readonly", False):
                store.close()
                raise CkptError("store is read-only (no write permission on the directory or its database); "
                                "pass store= a directory you can write to", path)
            return store

        try:
            self._writer = BackgroundWriter(open_store, on_error=_weak_callback(self._job_failed))
        except CkptError as e:
            raise TrackerError(f"cannot open the snapshot store: {e.message}", e.path or self.store_path) from None
        except OSError as e:
            raise TrackerError(f"cannot open the snapshot store: {e.strerror or e}", self.store_path) from None

        try:
            self._attach(slots, start_step)
        except BaseException:
            self._writer.close()
            raise
        self._atexit = _AtExit(self)
        atexit.register(self._atexit)
        # Forgotten and unreachable (model and optimizer gone, never closed): stop the writer thread.
        self._finalizer = weakref.finalize(self, _collected, self._writer, self._atexit, self._keys)
        self._finalizer.atexit = False  # interpreter exit is _AtExit's job: it can still write the last snapshot

    def _attach(self, slots: list[Any], start_step: int | None) -> None:
        """History, baseline, fingerprints, hooks: the part of attaching that needs the store."""
        optimizer = self.optimizer
        history = self._writer.call(lambda st: st.list(), "reading the history")
        self.resumed = bool(history)
        if start_step is not None:
            self.start_step = start_step
        elif history:
            self.start_step = max((h.step for h in history if h.step is not None), default=0)

        held = optimizer_tensor_ids(optimizer) if optimizer is not None else set()
        self._watch = FrozenWatch([slots[i] for i in self._frozen_idx], backstop_groups=self.backstop_every,
                                  owners=[self.tensors.owner.get(slots[i].name, slots[i].name.rpartition(".")[0])
                                          for i in self._frozen_idx],
                                  at_risk=[k for k, i in enumerate(self._frozen_idx) if id(slots[i].tensor) in held])
        self._watch.set_baseline(self.current_step)
        self._snap_stamps = [(s.tensor._version, s.tensor.data_ptr()) for s in slots]
        self._baseline_hashes: dict[str, str] = {}
        self._write_baseline(stream_refs(slots))

        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # -- public API ---------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The step of the last update seen (``start_step`` + updates since attach)."""
        return self.start_step + self.steps

    @property
    def stats(self) -> dict[str, Any]:
        """Cost accounting: time the hook spent on the training thread, bytes checksummed, writer stalls."""
        if not self.active:
            return {"active": False, "steps": self.steps}
        return {
            "steps": self.steps,
            "hook_seconds": self._hook_s,
            "writer_stall_seconds": self._writer.stalled_s,
            "checksummed_bytes": self._watch.checksummed_bytes,
            "snapshots_written": self._snapshots_written,
            "staging_bytes": self._staging.peak_bytes,
            "frozen_tensors": len(self._frozen_idx),
            "trainable_tensors": len(self._trainable_idx),
        }

    def log(self, step: int | None = None, **metrics: Any) -> None:
        """Attach metrics (loss, lr, ...) to a snapshot; the latest value of each name wins.

        They go to the snapshot taken at the current step if there is one
        (a loop logs a step's loss after its ``optimizer.step()``, which is
        where the snapshot was taken), else to the next one. Tensors are kept
        detached and converted on the writer thread, so logging a CUDA loss
        does not force a GPU sync. ``step`` records when the values were
        measured, if that is not the tracker's current step (stored as the
        ``metrics_step`` metric).
        """
        import torch

        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise TrackerError(f"metric {k!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
                v = v.detach()
            elif isinstance(v, bool):
                v = int(v)
            elif not isinstance(v, (int, float, str)) and not hasattr(v, "item"):
                raise TrackerError(f"metric {k!r} must be a number, a string or a scalar tensor, "
                                   f"got {type(v).__name__}")
            self._metrics[k] = v
        if step is not None:
            self._metrics_step = int(step)

    def step(self) -> None:
        """Count one update when tracking without an optimizer (with one, its step hook does this)."""
        if self.optimizer is not None:
            raise TrackerError("this tracker counts optimizer.step() calls by itself; call tracker.step() only "
                               "when tracking without an optimizer")
        self._advance()

    def snapshot(self, tag: str | None = None, message: str | None = None, *, wait: bool = False) -> str | None:
        """Record the trainable and changed tensors now; with ``wait=True`` return the snapshot id."""
        self._check_open()
        if not self.active:
            return None
        job = self._submit_snapshot(tag, message)
        if job is None or not wait:
            return None
        self._seal_metrics()
        try:
            return job.wait()
        except Exception:  # noqa: BLE001 - already recorded by the writer's error handler
            self._report_errors()
            return None

    def flush(self) -> None:
        """Wait for the snapshot in flight, then surface any store error."""
        if self.active:
            self._drain()
            self._report_errors()

    def close(self) -> None:
        """Final full drift check, a last snapshot if steps happened since the previous one, flush.

        With ``on_drift="raise"`` a drift found by the final check is raised
        after everything is flushed.
        """
        self._close(raise_drift=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self._close(raise_drift=True)
            return
        # The block failed: flush what we can, but the user's exception is the one that propagates.
        try:
            self._close(raise_drift=False)
        except Exception as e:  # noqa: BLE001
            self._record_error(f"closing after {exc_type.__name__}: {type(e).__name__}: {e}")
            try:
                _warn(StoreWarning(f"ckptdiff: closing the tracker after {exc_type.__name__} failed: {e} "
                                   "(see tracker.errors)"))
            except Exception:  # noqa: BLE001 - warnings turned into errors must not mask it either
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.current_step}"
        return (f"<ckptdiff.Tracker {self.store_path!r} {state}: {len(self.manifest.trainable)} trainable, "
                f"{len(self.manifest.frozen)} frozen, {len(self.manifest.buffers)} buffer tensors>")

    # -- the step hook ------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._open_seal is not None:
            self._seal_metrics()
        # A snapshot's side-stream copy must finish before this step overwrites the parameters.
        if self._param_wait:
            import torch
            for device, event in self._param_wait:
                torch.cuda.current_stream(device).wait_event(event)
            self._param_wait = []

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._advance()

    def _advance(self) -> None:
        if self._closed:
            return
        self.steps += 1
        if not self.active:
            return
        t0 = time.perf_counter()
        try:
            if self._open_seal is not None:
                self._seal_metrics()
            self._report_errors()
            if self.steps % self.check_every == 0:
                self._guarded(self._check, self.current_step)
            if self.steps % self.every == 0:
                self._guarded(self._submit_snapshot, None, None)
        finally:
            self._hook_s += time.perf_counter() - t0

    def _guarded(self, fn: Any, *args: Any) -> None:
        """Run one part of the hook; its own failure is reported, never ends the user's run."""
        try:
            fn(*args)
        except (FrozenDriftError, CkptError):
            raise  # on_drift="raise" / on_store_error="raise": the user asked for these
        except Exception as e:  # noqa: BLE001 - a bug or device error in the hook must not end the run
            self._pending = None
            self._record_error(f"the hook failed at step {self.current_step}: {type(e).__name__}: {e}")
            self._report_errors()

    def _check(self, step: int, *, everything: bool = False) -> None:
        suspects: list[tuple[int, int]] = []
        if self._pending is not None:
            pend, self._pending = self._pending, None
            suspects += [(i, pend.step) for i in self._watch.collect(pend)]
        pend = self._watch.launch(step, everything=everything, defer=self._defer_checks and not everything)
        if pend is not None:
            if self._defer_checks and not everything:
                self._pending = pend
            else:
                suspects += [(i, pend.step) for i in self._watch.collect(pend)]
        if suspects:
            self._on_suspects(suspects, step)

    # -- drift --------------------------------------------------------------------------
    def _on_suspects(self, suspects: list[tuple[int, int]], step: int) -> None:
        """Confirm exactly, record a ``drift`` snapshot, then warn / raise / record."""
        watch_idx = list(dict.fromkeys(i for i, _ in suspects))
        when = min(s for _, s in suspects)  # the step the check ran (deferred reads arrive a check later)
        slot_idx = [self._frozen_idx[i] for i in watch_idx]
        self._drain()
        last_clean = {i: self._watch.last_clean[i] for i in watch_idx}
        try:
            cap = self._capture(extra=slot_idx)

            def job(store: Any) -> tuple[list[DriftEvent], list[int]]:
                return self._confirm_and_record(store, cap, watch_idx, when, step, last_clean)

            events, cleared = self._writer.call(job, "recording a drift")
        except Exception as e:  # noqa: BLE001 - the drift is still reported, on the checksum's word
            self._record_error(f"recording the drift at step {when}: {e}")
            slots = [self._watch.slots[i] for i in watch_idx]
            events = [DriftEvent(when, tuple(s.names), s.kind, s.tensor.numel(), None, None, last_clean[i])
                      for s, i in zip(slots, watch_idx)]
            cleared = []
        for i in cleared:
            self._watch.mark_clean(i, step)
        for i in watch_idx:
            if i not in cleared:
                self._watch.mark_drifted(i)
        self._report_errors()
        if not events:
            return
        self._last_snapshot_steps = self.steps
        self.drift_events.extend(events)
        if self.on_drift == "raise":
            raise FrozenDriftError(events, when)
        if self.on_drift == "warn":
            shown = [f"  {e.describe()}" for e in events[:_WARN_LINES]]
            if len(events) > _WARN_LINES:
                shown.append(f"  ... and {len(events) - _WARN_LINES} more (tracker.drift_events has them all)")
            msg = "\n".join([f"ckptdiff: frozen tensors moved at step {when}:"] + shown + [hint_for(events)])
            _warn(DriftWarning(msg.rstrip()))

    def _confirm_and_record(self, store: Any, cap: Capture, watch_idx: list[int], step: int, snap_step: int,
                            last_clean: dict[int, int]) -> tuple[list[DriftEvent], list[int]]:
        """Writer thread: exact comparison with the baseline bytes, then the ``drift`` snapshot.

        ``step`` is when the drift was seen; ``snap_step`` when the bytes were
        captured (later by one check on the deferred CUDA path).
        """
        cap.wait()
        base = None
        if self.baseline_id is not None:
            try:
                base = store.open_snapshot(self.baseline_id)
            except Exception as e:  # noqa: BLE001 - degrade to checksum-only events
                self._record_error(f"reading the baseline to confirm a drift: {e}")
        events: list[DriftEvent] = []
        cleared: list[int] = []
        for i in watch_idx:
            slot = self._watch.slots[i]
            changed: int | None = None
            mad: float | None = None
            if base is not None and slot.name in base:
                try:
                    changed, mad = compare(base[slot.name], cap.refs[slot.name])
                except Exception as e:  # noqa: BLE001
                    self._record_error(f"comparing {slot.name} with the baseline: {e}")
                if changed == 0:
                    cleared.append(i)
                    continue
            events.append(DriftEvent(step, tuple(slot.names), slot.kind, slot.tensor.numel(), changed, mad,
                                     last_clean[i]))
        if not events:
            return events, cleared
        first = events[0]
        more = f" and {len(events) - 1} more" if len(events) > 1 else ""
        mad = f"max |Δ| = {first.max_abs_delta:.6g}" if first.confirmed else "checksum differs"
        message = f"frozen drift at step {step}: {first.name} ({mad}){more}"
        mets: dict[str, Any] = {}
        for e in events:
            if e.max_abs_delta is not None and math.isfinite(e.max_abs_delta):
                mets[f"drift_max_abs/{e.name}"] = e.max_abs_delta
        try:
            sid = self._write_snapshot(store, cap, step=snap_step, tag="drift", message=message, metrics=mets)
            events = [dataclasses.replace(e, snapshot=sid) for e in events]
        except Exception as e:  # noqa: BLE001
            self._record_error(f"writing the drift snapshot at step {step}: {e}")
        return events, cleared

    # -- snapshots ----------------------------------------------------------------------
    def _write_baseline(self, refs: Mapping[str, Any]) -> None:
        message = "baseline at attach (resumed run)" if self.resumed else "baseline at attach"

        def job(store: Any) -> str:
            from .progress import byte_bar

            with byte_bar("snapshot") as progress:  # a bar only on a terminal, for a large model
                sid = store.snapshot(refs, step=self.current_step, tag="baseline", message=message,
                                     manifest=self.manifest, source="hook", parent="latest", progress=progress)
            self._baseline_hashes = {n: e.hash for n, e in store.entries(sid).items()}
            return sid

        try:
            self.baseline_id = self._writer.call(job, "writing the baseline")
            self._written_step = self.current_step
            self.last_snapshot_id = self.baseline_id
            self._snapshots_written += 1
        except Exception:  # noqa: BLE001 - recorded by _job_failed
            self._report_errors()
            if self.on_store_error == "raise":
                raise

    def _select(self, extra: Sequence[int] = ()) -> list[int]:
        """Trainable tensors, everything whose version moved since the last written snapshot, drifted ones."""
        slots = self.tensors.slots
        if self.last_snapshot_id is None:
            return list(range(len(slots)))  # nothing to inherit from: write everything
        drifted = {self._frozen_idx[i] for i in self._watch.drifted}
        chosen = set(self._trainable_idx) | drifted | set(extra)
        for i, s in enumerate(slots):
            if i not in chosen:
                v, p = self._snap_stamps[i]
                if s.tensor._version != v or s.tensor.data_ptr() != p:
                    chosen.add(i)
        return sorted(chosen)

    def _capture(self, extra: Sequence[int] = ()) -> Capture:
        slots = self.tensors.slots
        cap = self._staging.capture([(i, slots[i]) for i in self._select(extra)])
        if cap.param_events:
            if self.optimizer is not None:
                self._param_wait = cap.param_events  # waited on in the next step's pre-hook
            else:
                import torch
                for device, event in cap.param_events:
                    torch.cuda.current_stream(device).wait_event(event)
        return cap

    def _refresh_slots(self) -> None:
        """Follow tensors the model replaced since attach (``module.weight = nn.Parameter(...)``).

        The per-step check watches tensor objects; a module attribute pointed
        at a new object is only seen here, once per snapshot (one state_dict
        walk, ~1 ms for hundreds of tensors). The new object's different
        storage makes it a suspect, so a frozen one is checksummed at the next
        check and reported if its values differ from the baseline.
        """
        import torch

        current = self.tensors.module.state_dict(keep_vars=True)
        for slot in self.tensors.slots:
            t = current.get(slot.name)
            if isinstance(t, torch.Tensor) and t is not slot.tensor:
                slot.dtype = _check_tensor(slot.name, t)
                slot.tensor = t

    def _submit_snapshot(self, tag: str | None, message: str | None) -> Any:
        self._drain()  # backpressure: at most one snapshot in flight, staging buffers reused
        try:
            self._refresh_slots()
            cap = self._capture()
        except Exception as e:  # noqa: BLE001 - e.g. pinned memory exhausted: skip this snapshot, keep training
            self._record_error(f"copying tensors for the snapshot at step {self.current_step}: {e}")
            self._report_errors()
            return None
        step = self.current_step
        self._last_snapshot_steps = self.steps
        seal = _MetricsSeal()
        self._open_seal = seal

        def job(store: Any) -> str:
            sid = self._write_snapshot(store, cap, step=step, tag=tag, message=message,
                                       metrics=self._convert_metrics(seal.take(_SEAL_TIMEOUT_S)))
            self._find_stale(store, sid, step)
            return sid

        return self._writer.submit(job, f"writing the snapshot at step {step}")

    def _write_snapshot(self, store: Any, cap: Capture, *, step: int, tag: str | None, message: str | None,
                        metrics: Mapping[str, Any]) -> str:
        """Runs on the writer thread."""
        cap.wait()
        sid = store.snapshot(cap.refs, step=step, tag=tag, message=message, metrics=metrics, source="hook",
                             parent="latest", inherit_from=self.last_snapshot_id)
        self._store_ok()
        self._written_step = step
        self.last_snapshot_id = sid
        for i, stamp in cap.stamps.items():
            self._snap_stamps[i] = stamp
        self._snapshots_written += 1
        return sid

    def _find_stale(self, store: Any, sid: str, step: int) -> None:
        """Trainable tensors still bitwise equal to the baseline after a whole interval: warn once each.

        Not before ``_STALE_MIN_STEPS`` updates, even with ``every=1``: zero-initialised chains get their
        first gradient only after a step (LoRA's ``A`` while ``B`` is still zero), which is not staleness.
        """
        if not self._baseline_hashes or step - self.start_step < max(self.every, _STALE_MIN_STEPS):
            return
        todo = [n for n in (self.tensors.slots[i].name for i in self._trainable_idx)
                if n not in self.stale and n not in self._moved]
        if not todo:
            return  # every trainable tensor has moved (once moved, never "still equal"): no store read
        entries = store.entries(sid)
        stale = []
        for name in todo:
            if name not in entries:
                continue
            if entries[name].hash == self._baseline_hashes.get(name):
                stale.append(name)
            else:
                self._moved.add(name)
        if stale:
            self.stale.extend(stale)
            with self._err_lock:
                self._unreported.append(
                    "\x00stale" + f"{len(stale)} trainable tensor(s) are still bitwise equal to the baseline at "
                    f"step {step}: {names_of(stale)}; check that they get gradients (connected to the loss, "
                    "requires_grad=True), that their learning rate is not 0, and that they are in the optimizer")

    def _seal_metrics(self) -> None:
        """Hand the metrics logged since the last snapshot to the one waiting to be written.

        A snapshot is captured inside ``optimizer.step()``, but loops log that
        step's loss *after* it; so its metrics are sealed only when the next
        step begins (or on snapshot/flush/close), and the write waits for them.
        """
        seal, self._open_seal = self._open_seal, None
        if seal is not None:
            with seal.lock:
                if seal.expired:
                    return  # written without them (the loop paused): they go to the next snapshot instead
                seal.metrics = self._take_metrics()
                seal.ready.set()

    def _drain(self) -> None:
        self._seal_metrics()
        self._writer.drain()

    def _take_metrics(self) -> dict[str, Any]:
        metrics, self._metrics = self._metrics, {}
        if self._metrics_step is not None:
            if self._metrics_step != self.current_step:
                metrics["metrics_step"] = self._metrics_step
            self._metrics_step = None
        return metrics

    @staticmethod
    def _convert_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in metrics.items():
            if hasattr(v, "item") and not isinstance(v, (int, float, str)):
                v = v.item()  # on the writer thread: a CUDA scalar syncs this thread, not training
            out[k] = v
        return out

    # -- errors -------------------------------------------------------------------------
    def _job_failed(self, job: Any) -> None:
        self._record_error(f"{job.label}: {job.error}")

    def _record_error(self, text: str) -> None:
        """Keep a failure; warn at the first of a streak only (a dead disk must not warn every step)."""
        with self._err_lock:
            self.store_failures += 1
            if len(self.errors) < _MAX_ERRORS:
                self.errors.append(text)
            if self._failing and self.on_store_error == "warn":
                self._quiet_failures += 1
                return
            self._failing = True
            self._unreported.append(text)

    def _store_ok(self) -> None:
        """Writer thread: a snapshot was written; the next failure starts a new streak (and warns)."""
        with self._err_lock:
            self._failing = False

    def _report_errors(self) -> None:
        """Surface writer-thread problems on the training thread (warnings belong to the caller's thread)."""
        if not self._unreported:
            return
        with self._err_lock:
            items, self._unreported = self._unreported, []
        failures = []
        for text in items:
            if text.startswith("\x00stale"):
                _warn(StaleWarning("ckptdiff: " + text[len("\x00stale"):]))
            else:
                failures.append(text)
                where = "tracker" if text.startswith("the hook failed") else "snapshot store"
                _warn(StoreWarning(f"ckptdiff: {where} {self.store_path}: {text} (training continues; "
                                   "further failures are not warned about until a snapshot is written again; "
                                   "see tracker.errors)"))
        if failures and self.on_store_error == "raise":
            raise CkptError(f"snapshot store failed: {failures[0]}", self.store_path)

    # -- closing ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TrackerError("this tracker is closed")

    def _close(self, *, raise_drift: bool) -> None:
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        if not self.active:
            self._release()
            return
        atexit.unregister(self._atexit)
        drift: FrozenDriftError | None = None
        try:
            try:
                self._check(self.current_step, everything=True)
            except FrozenDriftError as e:
                drift = e
            self._drain()
            # Steps since the last snapshot, or the last one failed to write: record the final state.
            if drift is None and (self.steps > self._last_snapshot_steps
                                  or self._written_step != self.current_step):
                self._submit_snapshot(None, "final snapshot at close")
        finally:
            self._closed = True
            self._release()
            self._finalizer.detach()
            self._seal_metrics()
            self._writer.close()
            self._staging.release()
            self._pending = None
            self._param_wait = []
            self._report_errors_quietly()
            if self._quiet_failures:
                _warn(StoreWarning(f"ckptdiff: snapshot store {self.store_path}: {self.store_failures} store "
                                   f"failure(s) in this run, {self._quiet_failures} of them not warned about "
                                   "(tracker.errors has the first messages)"))
        if drift is not None and raise_drift:
            raise drift

    def _report_errors_quietly(self) -> None:
        try:
            self._report_errors()
        except CkptError:
            if not self.errors:
                raise


#: A snapshot waits at most this long for its step's metrics before it is written without them, so a
#: loop that stops stepping (a long evaluation, a hang, a pre-emption coming) still gets it on disk.
_SEAL_TIMEOUT_S = 10.0


class _MetricsSeal:
    """The metrics of one snapshot, handed from the training thread to the writer exactly once."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.expired = False
        self.metrics: dict[str, Any] = {}

    def take(self, timeout: float) -> dict[str, Any]:
        """Writer thread: the sealed metrics, or none after ``timeout`` (later ones then go to the next)."""
        self.ready.wait(timeout)
        with self.lock:
            if not self.ready.is_set():
                self.expired = True
            return self.metrics


def _weak_callback(method: Any) -> Any:
    """``method`` called through a weak reference: the writer thread must not keep the tracker alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        m = ref()
        if m is not None:
            m(*args)
    return call


def _collected(writer: BackgroundWriter, at_exit: _AtExit, keys: Sequence[int]) -> None:
    """A tracker was garbage-collected unclosed: stop its thread (never blocks: gc may run on any thread)."""
    writer.stop()
    atexit.unregister(at_exit)
    with _OPEN_LOCK:
        for key in keys:
            ref = _OPEN.get(key)
            if ref is not None and ref() is None:
                del _OPEN[key]


class _AtExit:
    """Flush a tracker the script forgot to close (held weakly: does not keep the model alive)."""

    def __init__(self, tracker: Tracker) -> None:
        self._ref = weakref.ref(tracker)

    def __call__(self) -> None:
        tracker = self._ref()
        if tracker is not None:
            try:
                tracker._close(raise_drift=False)
            except Exception:  # noqa: BLE001 - never fail interpreter exit
                pass


__all__ = ["track", "audit", "open_tracker", "Tracker", "FrozenDriftError", "DriftEvent", "AuditFinding",
           "AuditReport", "DriftWarning", "AuditWarning", "StoreWarning", "StaleWarning", "TrackerError"]
