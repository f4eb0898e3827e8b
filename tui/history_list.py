"""The snapshot list: one row per snapshot, newest at the bottom like a log.

Rows are drawn from ``Store.list()`` alone; the "changed" and "drift"
columns need every snapshot's hashes, so they start as "…" and a worker fills
them in. The base and the marked snapshot are flagged in the first column so
the user always sees what the tensor table is comparing against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.style import Style

from . import fmt
from .history import SnapshotSummary
from .line_table import Cell, LineTable

BASE_MARK = "◆"
MARK = "★"

TAG = Style.parse("bold cyan")
DRIFT = Style.parse("bold red")
STALE = Style.parse("yellow")
OK = Style.parse("green")
BASE = Style.parse("bold magenta")
MARKED = Style.parse("bold yellow")


class HistoryList(LineTable):
    right_aligned = frozenset({"index", "step", "changed"})
    cursor_keeps = frozenset({DRIFT})
    min_width = {"mark": 2, "drift": 9}
    max_width = {"message": 48}

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.metric_keys: list[str] = []
        self.snapshots: list[Any] = []
        self.summaries: dict[int, SnapshotSummary] = {}
        self.base: int | None = None
        self.marked: int | None = None

    def set_snapshots(self, snapshots: Sequence[Any], now: float, metric_keys: list[str],
                      cursor: int | None = None) -> None:
        self.snapshots = list(snapshots)
        self.metric_keys = metric_keys
        self.set_columns([("mark", " "), ("index", "#"), ("step", "step"), ("time", "time"), ("tag", "tag")]
                         + [(f"m:{k}", k) for k in metric_keys]
                         + [("changed", "changed"), ("drift", "drift"), ("message", "message")])
        self.right_aligned = frozenset({"index", "step", "changed"} | {f"m:{k}" for k in metric_keys})
        rows = [self._row(i, s, now) for i, s in enumerate(self.snapshots)]
        self.set_data(rows, cursor=cursor)

    def _row(self, i: int, s: Any, now: float) -> list[Cell]:
        row: list[Cell] = [
            ("", None),
            (str(i), None),
            ("-" if s.step is None else str(s.step), None),
            (fmt.ago(s.created_at, now), None),
            (s.tag or "", TAG),
        ]
        for k in self.metric_keys:
            row.append((fmt.metric(s.metrics[k]) if k in s.metrics else "", None))
        row += [("…", None), ("…", None), (_one_line(s.message), None)]
        return row

    def set_summary(self, index: int, s: SnapshotSummary) -> None:
        self.summaries[index] = s
        if s.drifted_vs_base:
            drift: Cell = (f"▲ {s.drifted_vs_base}", DRIFT)
        elif s.stale_vs_base:
            drift = (f"• {s.stale_vs_base} stale", STALE)
        else:
            drift = ("ok", OK)
        row = list(self._rows[index])
        row[self.column_index("changed")] = (str(s.changed_vs_prev), None)
        row[self.column_index("drift")] = drift
        self.set_row(index, row)

    def set_marks(self, base: int | None, marked: int | None) -> None:
        """Flag the base (◆) and the marked snapshot (★); repaints only rows that change."""
        touched = {self.base, self.marked, base, marked} - {None}
        self.base, self.marked = base, marked
        col = self.column_index("mark")
        for i in touched:
            assert i is not None
            text = (BASE_MARK if i == base else "") + (MARK if i == marked else "")
            style = BASE if i == base else (MARKED if i == marked else None)
            row = list(self._rows[i])
            row[col] = (text, style)
            self.set_row(i, row)


def _one_line(msg: str | None) -> str:
    if not msg or not msg.strip():
        return ""
    return msg.strip().splitlines()[0]
