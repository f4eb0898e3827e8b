"""The hook's own failures (store errors, hook bugs) and the stale-tensor notices, surfaced on the right thread.

Failures happen on the writer thread, but warnings belong to the training
thread (that is where the user's filters and logs are), so they are queued
here and reported at the next step. A store that fails every step must not
warn every step nor grow a list forever: one warning per streak of failures,
the first :data:`MAX_ERRORS` messages kept, and a count at close.
"""

from __future__ import annotations

import threading

from ..errors import CkptError
from .alerts import StaleWarning, StoreWarning, warn

#: ``tracker.errors`` keeps this many messages.
MAX_ERRORS = 100

_STALE = "\x00stale"


class FailureLog:
    """Failures and notices from any thread, reported on the training thread."""

    def __init__(self, store_path: str, on_store_error: str) -> None:
        self.store_path = store_path
        self.on_store_error = on_store_error
        self.errors: list[str] = []
        self.count = 0  # all of them; ``errors`` keeps the first MAX_ERRORS messages
        self._failing = False  # in a streak of failures: warned at its first, quiet until a success
        self.quiet = 0
        self._lock = threading.Lock()
        self._unreported: list[str] = []

    def record(self, text: str) -> None:
        """Keep a failure; warn at the first of a streak only (a dead disk must not warn every step)."""
        with self._lock:
            self.count += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(text)
            if self._failing and self.on_store_error == "warn":
                self.quiet += 1
                return
            self._failing = True
            self._unreported.append(text)

    def ok(self) -> None:
        """Writer thread: a snapshot was written; the next failure starts a new streak (and warns)."""
        with self._lock:
            self._failing = False

    def stale(self, text: str) -> None:
        """Queue a stale-tensor notice (found on the writer thread) for the training thread."""
        with self._lock:
            self._unreported.append(_STALE + text)

    def report(self) -> None:
        """Warn about what was queued; with ``on_store_error="raise"`` raise the first failure."""
        if not self._unreported:
            return
        with self._lock:
            items, self._unreported = self._unreported, []
        failures = []
        for text in items:
            if text.startswith(_STALE):
                warn(StaleWarning("ckptdiff: " + text[len(_STALE):]))
                continue
            failures.append(text)
            where = "tracker" if text.startswith("the hook failed") else "snapshot store"
            warn(StoreWarning(f"ckptdiff: {where} {self.store_path}: {text} (training continues; further "
                              "failures are not warned about until a snapshot is written again; see "
                              "tracker.errors)"))
        if failures and self.on_store_error == "raise":
            raise CkptError(f"snapshot store failed: {failures[0]}", self.store_path)

    def report_at_close(self) -> None:
        """Final report: a raise only if nothing was kept to read, then the count of the quiet ones."""
        try:
            self.report()
        except CkptError:
            if not self.errors:
                raise
        if self.quiet:
            warn(StoreWarning(f"ckptdiff: snapshot store {self.store_path}: {self.count} store failure(s) in this "
                              f"run, {self.quiet} of them not warned about (tracker.errors has the first messages)"))


__all__ = ["FailureLog", "MAX_ERRORS"]
