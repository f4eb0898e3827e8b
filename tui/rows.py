"""Tensor-table rows: filtering, sorting and merging the engine's numbers in.

The table's row type is the engine's own :class:`~ckptdiff.report.TensorDiff`,
so the TUI shows exactly what ``ckptdiff diff`` would report. The first
picture comes from hashes alone (:func:`ckptdiff.policy.hash_rows`, the same
policy the engine applies); the engine later fills in max |Δ| and rel L2,
and its verdict replaces the row.

:class:`TableQuery` is the filter/sort state of a table, as data, so it can
be tested without a terminal and shared between the history and pair screens.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckptdiff.report import STATUSES, TensorDiff

ROLE_CHOICES = (None, "frozen", "trainable", "buffer", "unknown")
#: The ``c`` key cycles these; "any" means anything that is not identical.
STATUS_CHOICES = (None, "any", "identical")
SORT_KEYS = ("name", "role", "status", "shape", "dtype", "max", "rel", "cause", "hash")


def merge_measured(row: TensorDiff, measured: TensorDiff) -> TensorDiff:
    """The engine's verdict wins, but keep the store's hashes when the engine did not hash."""
    out = measured.copy()
    out.hash_old, out.hash_new = measured.hash_old or row.hash_old, measured.hash_new or row.hash_new
    return out


class FilterError(ValueError):
    """The filter text is not a valid pattern (shown to the user, never raised past the UI)."""


def name_matcher(pattern: str) -> Callable[[str], bool]:
    """Glob when it has wildcards, regex with ``re:`` or ``/.../``, plain substring otherwise.

    Globs match the whole name (``*.weight``); a bare word matches anywhere,
    which is what a user typing ``attn`` expects.
    """
    p = pattern.strip()
    if not p:
        return lambda _name: True
    rx: str | None = None
    if p.startswith("re:"):
        rx = p[3:]
    elif len(p) >= 2 and p.startswith("/") and p.endswith("/"):
        rx = p[1:-1]
    if rx is not None:
        try:
            compiled = re.compile(rx)
        except re.error as e:
            raise FilterError(f"bad regex {rx!r}: {e}") from None
        return lambda name: compiled.search(name) is not None
    if any(c in p for c in "*?["):
        compiled = re.compile(fnmatch.translate(p))
        return lambda name: compiled.match(name) is not None
    return lambda name: p in name


@dataclass
class TableQuery:
    """What the tensor table shows, and in which order."""

    text: str = ""                  # name pattern, plus role:X status:X is:drift is:stale tokens
    role: str | None = None         # from the role cycle (the text's role: wins)
    status: str | None = None       # a STATUSES value, 'any' (not identical), or None
    drift_only: bool = False
    drift_first: bool = True        # drifted frozen rows pulled to the top, then stale ones
    sort: str = "name"              # one of SORT_KEYS
    reverse: bool = False

    def parse(self) -> tuple[Callable[[str], bool], str | None, str | None, set[str]]:
        words: list[str] = []
        role, status, flags = self.role, self.status, set()
        for tok in self.text.split():
            key, sep, val = tok.partition(":")
            if sep and key == "role":
                if val not in ("trainable", "frozen", "buffer", "unknown"):
                    raise FilterError(f"unknown role {val!r} (trainable, frozen, buffer, unknown)")
                role = val
            elif sep and key == "status":
                if val not in STATUSES and val != "any":
                    raise FilterError(f"unknown status {val!r} ({', '.join(STATUSES)}, any)")
                status = val
            elif sep and key == "is":
                if val not in ("drift", "stale"):
                    raise FilterError(f"unknown flag is:{val} (is:drift, is:stale)")
                flags.add(val)
            else:
                words.append(tok)
        return name_matcher(" ".join(words)), role, status, flags

    def apply(self, rows: Iterable[TensorDiff]) -> list[TensorDiff]:
        """Filter then sort; raises FilterError for a bad pattern."""
        match, role, status, flags = self.parse()
        if self.drift_only:
            flags = flags | {"drift"}
        kept = [
            r for r in rows
            if match(r.name)
            and (role is None or r.role == role)
            and (status is None or (r.status != "identical" if status == "any" else r.status == status))
            and ("drift" not in flags or r.drift)
            and ("stale" not in flags or r.stale)
        ]
        return sort_rows(kept, self.sort, self.reverse, self.drift_first)

    def describe(self) -> str:
        """A short line for the status bar, e.g. 'filter enc* · role frozen · drift only'."""
        bits = []
        if self.text.strip():
            bits.append(f"filter {self.text.strip()}")
        if self.role:
            bits.append(f"role {self.role}")
        if self.status:
            bits.append("status " + ("not identical" if self.status == "any" else self.status))
        if self.drift_only:
            bits.append("drift only")
        bits.append(f"sort {self.sort}{' ↓' if self.reverse else ''}")
        return " · ".join(bits)


def _key(sort: str) -> Callable[[TensorDiff], Any]:
    if sort == "name":
        return lambda r: r.name
    if sort == "role":
        return lambda r: (r.role, r.name)
    if sort == "status":
        return lambda r: (STATUSES.index(r.status) if r.status in STATUSES else 99, r.name)
    if sort == "shape":
        return lambda r: (r.numel or 0, r.name)
    if sort == "dtype":
        return lambda r: (r.dtype_new or r.dtype_old or "", r.name)
    if sort == "max":
        return lambda r: r.max_abs_delta
    if sort == "rel":
        return lambda r: r.rel_l2
    if sort == "cause":
        return lambda r: (r.cause or "", r.name)
    if sort == "hash":
        return lambda r: r.hash_new or r.hash_old or ""
    raise ValueError(f"unknown sort key {sort!r}")


def sort_rows(rows: list[TensorDiff], sort: str, reverse: bool, drift_first: bool) -> list[TensorDiff]:
    """Sort by one column; unknown numbers (not measured yet) always go last.

    Numeric columns sort largest first by default (the interesting end);
    ``reverse`` flips that like it flips every other column.
    """
    key = _key(sort)
    numeric = sort in ("max", "rel")
    known = [r for r in rows if not numeric or key(r) is not None]
    unknown = [r for r in rows if numeric and key(r) is None]
    if numeric:
        known.sort(key=lambda r: (_nan_low(key(r)), r.name), reverse=not reverse)
    else:
        known.sort(key=key, reverse=reverse)
    unknown.sort(key=lambda r: r.name)
    out = known + unknown
    if drift_first:
        # A stable sort on the rank keeps the column order inside each group.
        out.sort(key=lambda r: 0 if r.drift else (1 if r.stale else 2))
    return out


def _nan_low(x: float) -> float:
    return float("-inf") if x != x else x
