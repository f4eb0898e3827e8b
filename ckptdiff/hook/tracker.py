"""The Tracker: attaches the parts of the hook to one model and runs them after every optimizer step.

At attach it audits the optimizer, derives the manifest, writes the baseline
and fingerprints the frozen tensors; then, after every ``optimizer.step()``
(its step post-hook; without an optimizer, :meth:`Tracker.step`), it runs
the drift check every ``check_every`` steps and a snapshot every ``every``
steps. Each concept lives in its own module; this one only orders them:

* options and their validation: :mod:`.options`
* the model's tensors and roles: :mod:`.model`; the audit: :mod:`.audit`
* snapshot scheduling: :mod:`.schedule`; capture and the chain of snapshots:
  :mod:`.capture`, :mod:`.snapshots`; the background writer: :mod:`.writer`
* drift checking and confirmation: :mod:`.fingerprint`, :mod:`.checking`,
  :mod:`.drift`; stale trainable tensors: :mod:`.stale`
* metrics: :mod:`.metrics`; failures and warnings: :mod:`.failures`, :mod:`.alerts`
* one tracker per model, exit and garbage collection: :mod:`.lifecycle`
* ranks and collectives under torch.distributed: :mod:`.distributed`,
  :mod:`.replicas`

Under torch.distributed every rank runs the hook (steps, drift checks,
gathers of sharded tensors) and the writing ranks (rank 0, unless
``rank0_only=False``) also write: ``snapshot()``, ``flush()`` and
``close()`` are then collective, to be called on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import CkptError
from .alerts import AuditWarning, StoreWarning, warn
from .audit import AuditReport, run_audit
from .capture import Capture
from .checking import DriftChecker, act
from .distributed import Collectives, Ranks, whole
from .drift import DriftEvent, FrozenDriftError, ReplicaDivergence
from .failures import FailureLog
from .lifecycle import Lifeline, claim, release, weak_callback
from .metrics import MetricsLog
from .model import ModelTensors, TrackerError, collect, optimizer_tensor_ids
from .options import Options, inner_optimizer
from .replicas import ReplicaCheck, act_on_divergence
from .schedule import SnapshotSchedule
from .snapshots import SnapshotChain
from .stale import StaleFinder
from .writer import BackgroundWriter, Job


class Tracker:
    """Watches one model (and optimizer) during training. Create it with :func:`ckptdiff.track`.

    Public state: ``manifest`` (derived roles), ``audit_report``,
    ``drift_events`` (every confirmed drift), ``stale`` (trainable tensors
    that never moved), ``errors`` (store failures, as strings),
    ``baseline_id``, ``current_step``, ``stats``; under torch.distributed
    ``ranks`` (this rank, the world size), ``writes`` (whether this rank
    writes a history) and ``replica_divergences``.
    """

    def __init__(self, model: Any, optimizer: Any = None, *, store: Any = "runs/exp1", every: int = 100,
                 trainable: str | Sequence[str] | None = None, on_drift: str = "warn", check_every: int = 1,
                 backstop_every: int | None = None, start_step: int | None = None, on_store_error: str = "warn",
                 audit: bool = True, rank0_only: bool = True, replica_check_every: int | None = None,
                 metrics_reduce: str | None = None) -> None:
        self.options = opts = Options.parse(
            store=store, every=every, check_every=check_every, backstop_every=backstop_every, on_drift=on_drift,
            on_store_error=on_store_error, start_step=start_step, audit=audit, rank0_only=rank0_only,
            replica_check_every=replica_check_every, metrics_reduce=metrics_reduce)
        self.optimizer = optimizer = inner_optimizer(optimizer)
        self.model = model
        self.ranks = Ranks.detect()
        self._comm = Collectives(self.ranks)
        self.writes = not opts.rank0_only or self.ranks.rank == 0
        self.store_path = self.ranks.store_path(opts.store_path, rank0_only=opts.rank0_only)
        self.on_drift = on_drift
        self._failures = FailureLog(self.store_path, on_store_error)
        self.errors = self._failures.errors
        self._metrics = MetricsLog(self._comm, opts.metrics_reduce)
        self.steps = 0
        self.start_step = 0
        self.resumed = False
        self._closed = False
        self._handles: list[Any] = []
        self._hook_s = 0.0
        self._last_snapshot_steps = 0
        self._chain: SnapshotChain | None = None
        opt_ids = optimizer_tensor_ids(optimizer) if optimizer is not None else None
        self.tensors: ModelTensors = collect(model, optimizer_ids=opt_ids, trainable=trainable)
        self._keys = claim(self, self.tensors.module, optimizer)
        try:
            self._attach(trainable)
        except BaseException:
            release(self, self._keys)
            raise

    # -- attaching ----------------------------------------------------------------------
    def _attach(self, trainable: Any) -> None:
        self.manifest = self.tensors.manifest()
        self.audit_report = (run_audit(self.model, self.optimizer, trainable=trainable, tensors=self.tensors)
                             if self.options.audit else AuditReport())
        if self.audit_report.errors:
            raise TrackerError("cannot track this optimizer:\n" + str(self.audit_report))
        if self.ranks.rank == 0:  # every rank finds the same: one copy of each warning is enough
            for finding in self.audit_report.warnings:
                warn(AuditWarning(str(finding)))
        if not self.writes:
            self._start()  # this rank checks and gathers; rank 0 writes the history
            self._lifeline = Lifeline(self, lambda: None, self._keys)
            return
        self._writer = self._open_writer()
        try:
            self._start()
        except BaseException:
            self._writer.close()
            raise
        self._lifeline = Lifeline(self, self._writer.stop, self._keys)

    def _open_writer(self) -> BackgroundWriter:
        from ..store import Store

        path = self.store_path

        def open_store() -> Any:
            store = Store.open(path, create=True)
            if getattr(store, "readonly", False):
                store.close()
                raise CkptError("store is read-only (no write permission on the directory or its database); "
                                "pass store= a directory you can write to", path)
            return store

        try:
            return BackgroundWriter(open_store, on_error=weak_callback(self._job_failed))
        except CkptError as e:
            raise TrackerError(f"cannot open the snapshot store: {e.message}", e.path or path) from None
        except OSError as e:
            raise TrackerError(f"cannot open the snapshot store: {e.strerror or e}", path) from None

    def _start(self) -> None:
        """History, fingerprints, baseline, hooks: the part of attaching that needs the store."""
        opts, tensors, optimizer = self.options, self.tensors, self.optimizer
        if self.writes:
            history = self._writer.call(lambda st: st.list(), "reading the history")
            self.resumed = bool(history)
            if history and opts.start_step is None:
                self.start_step = max((h.step for h in history if h.step is not None), default=0)
        if opts.start_step is not None:
            self.start_step = opts.start_step
        elif self._comm.ready and opts.rank0_only:
            self.start_step = self._comm.objects(self.start_step)[0]  # rank 0 read the history
        self._schedule = SnapshotSchedule(tensors, opts.every)
        cuda = any(s.local.device.type == "cuda" for s in tensors.slots)
        # Deferred reads (a check late) would leave the ranks nothing to agree on at the step itself.
        defer = cuda and opts.on_drift != "raise" and self.ranks.world == 1
        self._drift = DriftChecker(tensors, self._schedule, backstop_every=opts.backstop_every,
                                   optimizer_ids=optimizer_tensor_ids(optimizer) if optimizer is not None else set(),
                                   defer=defer, step=self.current_step)
        self._watch = self._drift.watch
        self._replicas = ReplicaCheck(self._watch, self._comm, opts.replica_check_every)
        gathered = {}
        for i in self._schedule.sharded_idx:  # every rank, in the same order: full_tensor() is a collective
            full = whole(tensors.slots[i])
            if self.writes:
                gathered[i] = full.cpu()
        if self.writes:
            self._chain = SnapshotChain(tensors, self._schedule, self._writer, self._failures,
                                        hooked_optimizer=optimizer is not None)
            self._staging = self._chain.staging
            self._stale = StaleFinder([tensors.slots[i].name for i in self._schedule.trainable_idx],
                                      every=opts.every, start_step=self.start_step)
            try:
                self._chain.write_baseline(step=self.current_step, manifest=self.manifest, resumed=self.resumed,
                                           gathered=gathered)
            except Exception:  # noqa: BLE001 - recorded by _job_failed
                self._failures.report()
                if opts.on_store_error == "raise":
                    raise
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # -- public API ---------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The step of the last update seen (``start_step`` + updates since attach)."""
        return self.start_step + self.steps

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def drift_events(self) -> list[DriftEvent]:
        return self._drift.events

    @property
    def replica_divergences(self) -> list[ReplicaDivergence]:
        return self._replicas.divergences

    @property
    def stale(self) -> list[str]:
        return self._stale.stale if self._chain is not None else []

    @property
    def baseline_id(self) -> str | None:
        return self._chain.baseline_id if self._chain is not None else None

    @property
    def last_snapshot_id(self) -> str | None:
        return self._chain.last_id if self._chain is not None else None

    @property
    def store_failures(self) -> int:
        return self._failures.count

    @property
    def stats(self) -> dict[str, Any]:
        """Cost accounting: time the hook spent on the training thread, bytes checksummed, writer stalls."""
        chain = self._chain
        return {
            "steps": self.steps,
            "rank": self.ranks.rank,
            "writes": self.writes,
            "hook_seconds": self._hook_s,
            "writer_stall_seconds": self._writer.stalled_s if chain is not None else 0.0,
            "checksummed_bytes": self._watch.checksummed_bytes,
            "snapshots_written": chain.count if chain is not None else 0,
            "staging_bytes": chain.staging.peak_bytes if chain is not None else 0,
            "frozen_tensors": len(self._schedule.frozen_idx),
            "trainable_tensors": len(self._schedule.trainable_idx),
        }

    def log(self, step: int | None = None, **metrics: Any) -> None:
        """Attach metrics (loss, lr, ...) to a snapshot; the latest value of each name wins.

        They go to the snapshot taken at the current step if there is one
        (a loop logs a step's loss after its ``optimizer.step()``, which is
        where the snapshot was taken), else to the next one. Tensors are kept
        detached and converted on the writer thread, so logging a CUDA loss
        does not force a GPU sync. ``step`` records when the values were
        measured, if that is not the tracker's current step (stored as the
        ``metrics_step`` metric). Under torch.distributed they are the
        writing rank's values (``metrics_rank``), or the mean over ranks with
        ``metrics_reduce="mean"``.
        """
        self._metrics.log(step, metrics)

    def step(self) -> None:
        """Count one update when tracking without an optimizer (with one, its step hook does this)."""
        if self.optimizer is not None:
            raise TrackerError("this tracker counts optimizer.step() calls by itself; call tracker.step() only "
                               "when tracking without an optimizer")
        self._advance()

    def snapshot(self, tag: str | None = None, message: str | None = None, *, wait: bool = False) -> str | None:
        """Record the trainable and changed tensors now; with ``wait=True`` return the snapshot id.

        Under torch.distributed call it on every rank (sharded tensors are gathered by all of them).
        """
        if self._closed:
            raise TrackerError("this tracker is closed")
        job = self._submit_snapshot(tag, message)
        if job is None or not wait:
            return None
        self._metrics.seal(self.current_step)
        try:
            return job.wait()
        except Exception:  # noqa: BLE001 - already recorded by the writer's error handler
            self._failures.report()
            return None

    def flush(self) -> None:
        """Wait for the snapshot in flight, then surface any store error."""
        self._drain()
        self._failures.report()

    def close(self) -> None:
        """Final full drift check, a last snapshot if steps happened since the previous one, flush.

        With ``on_drift="raise"`` a drift found by the final check is raised
        after everything is flushed. Under torch.distributed call it on every rank.
        """
        self._close(raise_drift=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self._close(raise_drift=True)
            return
        # The block failed: flush what we can, but the user's exception is the one that propagates. Only a
        # drift error was raised on every rank together; after any other, the other ranks may not be here.
        try:
            self._close(raise_drift=False, collective=issubclass(exc_type, FrozenDriftError))
        except Exception as e:  # noqa: BLE001
            self._failures.record(f"closing after {exc_type.__name__}: {type(e).__name__}: {e}")
            try:
                warn(StoreWarning(f"ckptdiff: closing the tracker after {exc_type.__name__} failed: {e} "
                                  "(see tracker.errors)"))
            except Exception:  # noqa: BLE001 - warnings turned into errors must not mask it either
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.current_step}"
        rank = f" {self.ranks}" if self.ranks.world > 1 else ""
        return (f"<ckptdiff.Tracker {self.store_path!r}{rank} {state}: {len(self.manifest.trainable)} trainable, "
                f"{len(self.manifest.frozen)} frozen, {len(self.manifest.buffers)} buffer tensors>")

    # -- the step hook ------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._metrics.waiting:
            self._metrics.seal(self.current_step)
        if self._chain is not None:
            self._chain.wait_for_copies()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._advance()

    def _advance(self) -> None:
        if self._closed:
            return
        self.steps += 1
        t0 = time.perf_counter()
        try:
            if self._metrics.waiting:
                self._metrics.seal(self.current_step)
            self._failures.report()
            if self.steps % self.options.check_every == 0:
                self._guarded(self._check, self.current_step)
            if self._replicas.due(self.steps):
                self._guarded(self._compare_replicas, self.current_step)
            if self._schedule.due(self.steps):
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
            self._drift.pending = None
            self._failures.record(f"the hook failed at step {self.current_step}: {type(e).__name__}: {e}")
            self._failures.report()

    # -- drift ----------------------------------------------------------------------------
    def _check(self, step: int, *, everything: bool = False) -> None:
        """The drift check; suspects are confirmed, agreed on by every rank, then reported."""
        drift = self._drift
        if not drift.watch.slots:
            return  # nothing frozen: nothing to check, nothing to agree on (the same on every rank)
        suspects = drift.check(step, everything=everything)
        mine = list(dict.fromkeys(i for i, _ in suspects))
        agreed = self._comm.union(len(drift.watch.slots), mine) if self._comm.ready else mine
        if not agreed:
            return
        when = min((s for _, s in suspects), default=step)  # deferred reads arrive a check later
        self._drain()
        last_clean = {i: drift.watch.last_clean[i] for i in agreed}
        events, cleared = self._confirm(agreed, set(mine), when, step, last_clean)
        if self._comm.ready:
            events, cleared = drift.agree(self._comm, agreed, events, when, last_clean)
        drift.settle(events, cleared, step)
        self._failures.report()
        if events:
            self._last_snapshot_steps = self.steps
            act(events, when, self.on_drift)

    def _confirm(self, agreed: list[int], mine: set[int], when: int, step: int, last_clean: dict[int, int]
                 ) -> tuple[list[DriftEvent], list[int]]:
        """Exact verdicts where the history is written (with a ``drift`` snapshot); the checksum's elsewhere."""
        drift = self._drift
        extra = [drift.frozen_idx[i] for i in agreed]
        chain, failures = self._chain, self._failures
        if chain is None:
            try:
                self._capture(extra=extra)  # takes part in the gathers the writing rank makes
            except Exception as e:  # noqa: BLE001 - the verdict stands on the checksum's word anyway
                failures.record(f"gathering the drifted tensors at step {when}: {e}")
            return ([drift.unconfirmed(i, when, last_clean[i]) for i in agreed if i in mine],
                    [i for i in agreed if i not in mine])
        try:
            cap = self._capture(extra=extra)

            def job(store: Any) -> tuple[list[DriftEvent], list[int]]:
                return drift.confirm(store, cap, chain, failures, agreed, when, step, last_clean)

            return self._writer.call(job, "recording a drift")
        except Exception as e:  # noqa: BLE001 - the drift is still reported, on the checksum's word
            failures.record(f"recording the drift at step {when}: {e}")
            return [drift.unconfirmed(i, when, last_clean[i]) for i in agreed], []

    def _compare_replicas(self, step: int) -> None:
        found = self._replicas.run(step)
        if found:
            act_on_divergence(found, step, self.on_drift)

    # -- snapshots ------------------------------------------------------------------------
    def _capture(self, extra: Sequence[int] = ()) -> Capture | None:
        """Copy what the next snapshot holds; sharded tensors are gathered by every rank, in the same order."""
        slots = self.tensors.slots
        has_parent = self._chain is None or self._chain.last_id is not None
        chosen = self._schedule.select(has_parent=has_parent, drifted=self._drift.drifted_slots(), extra=extra)
        sharded = self._schedule.sharded_idx
        if sharded and self.ranks.world > 1:
            chosen = self._comm.with_agreed(chosen, sharded)
        if self._chain is None:
            for i in chosen:
                if slots[i].sharded:
                    whole(slots[i])
            self._schedule.written({i: slots[i].stamp() for i in chosen})
            return None
        return self._chain.capture(chosen, whole)

    def _submit_snapshot(self, tag: str | None, message: str | None) -> Job[str] | None:
        self._drain()  # backpressure: at most one snapshot in flight, staging buffers reused
        seal = self._metrics.open_seal()  # on every rank, whatever happens next: sealing may be collective
        try:
            self.tensors.refresh()
            cap = self._capture()
        except Exception as e:  # noqa: BLE001 - e.g. pinned memory exhausted: skip this snapshot, keep training
            seal.expire()  # its metrics go to the next snapshot
            self._failures.record(f"copying tensors for the snapshot at step {self.current_step}: {e}")
            self._failures.report()
            return None
        step = self.current_step
        self._last_snapshot_steps = self.steps
        if self._chain is None or cap is None:
            return None  # this rank took part in the gathers; the writing rank writes
        chain, stale, failures = self._chain, self._stale, self._failures

        def job(store: Any) -> str:
            sid = chain.write(store, cap, step=step, tag=tag, message=message, metrics=seal.take())
            notice = stale.find(store, sid, step, chain.baseline_hashes)
            if notice:
                failures.stale(notice)
            return sid

        return self._writer.submit(job, f"writing the snapshot at step {step}")

    def _drain(self) -> None:
        self._metrics.seal(self.current_step)
        if self._chain is not None:
            self._writer.drain()

    def _job_failed(self, job: Job[Any]) -> None:
        self._failures.record(f"{job.label}: {job.error}")

    # -- closing ------------------------------------------------------------------------
    def _close(self, *, raise_drift: bool, collective: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        if not collective:
            self._comm.solo()
        self._lifeline.detach()
        drift: FrozenDriftError | None = None
        chain = self._chain
        try:
            try:
                self._check(self.current_step, everything=True)
            except FrozenDriftError as e:
                drift = e
            self._drain()
            # Steps since the last snapshot, or the last one failed to write: record the final state.
            want = drift is None and (self.steps > self._last_snapshot_steps
                                      or (chain is not None and chain.written_step != self.current_step))
            if self._comm.ready:  # on every rank or on none: it may gather, and its metrics seal may reduce
                want = bool(self._comm.union(1, [0] if want else []))
            if want:
                self._submit_snapshot(None, "final snapshot at close")
        finally:
            release(self, self._keys)
            self._metrics.seal(self.current_step)
            if chain is not None:
                self._writer.close()
                chain.close()
            self._drift.pending = None
            self._failures.report_at_close()
        if drift is not None and raise_drift:
            raise drift


__all__ = ["Tracker"]
