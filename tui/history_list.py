"""The snapshot list: one row per snapshot, newest at the bottom like a log.

Rows are drawn from ``Store.list()`` alone; the "changed" and "drift"
columns need every snapshot's hashes, so they start as "…" and a worker fills
them in. The base and the marked snapshot are flagged in the first column so
the user always sees what the tensor table is comparing against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from . import fmt
from .history import SnapshotSummary

BASE_MARK = "◆"
MARK = "★"


class HistoryList(DataTable):
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.metric_keys: list[str] = []
        self.snapshots: list[Any] = []
        self.summaries: dict[int, SnapshotSummary] = {}

    def set_snapshots(self, snapshots: Sequence[Any], now: float, metric_keys: list[str]) -> None:
        self.clear(columns=True)
        self.snapshots = list(snapshots)
        self.metric_keys = metric_keys
        self.add_column(" ", key="mark", width=2)
        self.add_column("#", key="index")
        self.add_column("step", key="step")
        self.add_column("time", key="time")
        self.add_column("tag", key="tag")
        for k in metric_keys:
            self.add_column(k, key=f"m:{k}")
        self.add_column("changed", key="changed")
        self.add_column("drift", key="drift", width=9)
        self.add_column("message", key="message")
        for i, s in enumerate(self.snapshots):
            row: list[Any] = [
                "",
                Text(str(i), justify="right"),
                Text("-" if s.step is None else str(s.step), justify="right"),
                fmt.ago(s.created_at, now),
                Text(s.tag or "", style="bold cyan"),
            ]
            for k in metric_keys:
                row.append(Text(fmt.metric(s.metrics[k]) if k in s.metrics else "", justify="right"))
            row += [Text("…", justify="right"), Text("…"), _one_line(s.message)]
            self.add_row(*row, key=str(i))

    def set_summary(self, index: int, s: SnapshotSummary) -> None:
        self.summaries[index] = s
        key = str(index)
        if key not in self.rows:
            return
        self.update_cell(key, "changed", Text(str(s.changed_vs_prev), justify="right"))
        if s.drifted_vs_base:
            drift = Text(f"▲ {s.drifted_vs_base}", style="bold red")
        elif s.stale_vs_base:
            drift = Text(f"• {s.stale_vs_base} stale", style="yellow")
        else:
            drift = Text("ok", style="green")
        self.update_cell(key, "drift", drift)

    def set_marks(self, base: int | None, marked: int | None) -> None:
        for i in range(len(self.snapshots)):
            text = Text()
            if i == base:
                text.append(BASE_MARK, style="bold magenta")
            if i == marked:
                text.append(MARK, style="bold yellow")
            self.update_cell(str(i), "mark", text)


def _one_line(msg: str | None, limit: int = 40) -> str:
    if not msg:
        return ""
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
