"""The background writer: one thread owns the store, at most one job in flight.

Why a single slot instead of a queue: a queue of snapshots is a queue of
host copies of the model, so an unbounded one turns a slow disk into an
out-of-memory crash. With one slot, a snapshot that comes due while the
previous one is still writing waits (backpressure) and the time it waited is
counted in :attr:`BackgroundWriter.stalled_s`, which the benchmark reports.

The store is opened on this thread, only ever touched here and closed here,
so SQLite and the blob files see one writer per tracker. A job's exception
is kept in its :class:`Job` and handed to ``on_error`` (the tracker records
it and warns on the training thread); it never kills the thread.

The thread holds no reference to the tracker between jobs (the tracker
passes ``on_error`` as a weak method): a running thread is a GC root, so a
strong reference would keep a forgotten tracker, and its model, alive
forever. :meth:`BackgroundWriter.stop` never blocks, so it is safe from a
``weakref.finalize`` callback, whichever thread the collector runs on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Job(Generic[T]):
    def __init__(self, fn: Callable[[Any], T], label: str) -> None:
        self.fn = fn
        self.label = label
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def wait(self, timeout: float | None = None) -> T:
        """The job's result; re-raises its exception."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"ckptdiff writer: {self.label} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class BackgroundWriter:
    def __init__(self, open_store: Callable[[], Any], *, on_error: Callable[[Job[Any]], None] | None = None,
                 name: str = "ckptdiff-writer") -> None:
        self._cond = threading.Condition()
        self._slot: Job[Any] | None = None
        self._closing = False
        self._on_error = on_error
        self.store: Any = None
        self.stalled_s = 0.0
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        opened: Job[Any] = Job(lambda _store: open_store(), "opening the store")
        self._slot = opened
        self._thread.start()
        try:
            self.store = opened.wait()
        except BaseException:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            raise

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._slot is not None

    def submit(self, fn: Callable[[Any], T], label: str) -> Job[T]:
        """Hand ``fn(store)`` to the thread; blocks while the previous job is still running."""
        job: Job[T] = Job(fn, label)
        t0 = time.perf_counter()
        with self._cond:
            while self._slot is not None and not self._closing:
                self._cond.wait()
            if self._closing:
                raise RuntimeError("ckptdiff writer is closed")
            self._slot = job
            self._cond.notify_all()
        self.stalled_s += time.perf_counter() - t0
        return job

    def call(self, fn: Callable[[Any], T], label: str) -> T:
        return self.submit(fn, label).wait()

    def drain(self) -> None:
        """Wait until no job is in flight."""
        t0 = time.perf_counter()
        with self._cond:
            while self._slot is not None and self._thread.is_alive():
                self._cond.wait(0.5)
        self.stalled_s += time.perf_counter() - t0

    def stop(self) -> None:
        """Ask the thread to finish its job in flight, close the store and exit; returns at once."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closing

    def close(self, timeout: float | None = None) -> None:
        """Wait for the job in flight, then stop the thread (which closes the store it owns)."""
        if threading.current_thread() is self._thread:  # pragma: no cover - a job closing its own writer
            self.stop()
            return
        self.drain()
        self.stop()
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._slot is None and not self._closing:
                        self._cond.wait()
                    if self._slot is None:
                        return
                    job = self._slot
                self._run(job)
                del job  # hold nothing of the tracker's while idle (see the module docstring)
                with self._cond:
                    self._slot = None
                    self.jobs_done += 1
                    self._cond.notify_all()
        finally:
            close = getattr(self.store, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing a broken store must not mask the run's outcome
                    pass
            self.store = None

    def _run(self, job: Job[Any]) -> None:
        try:
            job.result = job.fn(self.store)
        except BaseException as e:  # noqa: BLE001 - reported, never kills the thread
            job.error = e
            on_error = self._on_error
            if on_error is not None and self.store is not None:
                try:
                    on_error(job)
                except Exception:  # noqa: BLE001
                    pass
        finally:
            job.fn = _done  # drop the closure (it references the tracker and staged tensors)
            job.done.set()


def _done(_store: Any) -> None:
    return None


__all__ = ["BackgroundWriter", "Job"]
