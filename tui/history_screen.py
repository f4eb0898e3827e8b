"""History mode: the snapshot list on top, the selected snapshot's diff below.

The first screen comes from SQLite metadata only: the snapshot list from
``Store.list()`` and the tensor table from two snapshots' entry hashes, so a
store of hundreds of snapshots opens at once. Blobs are read afterwards, in
workers, to fill in max |Δ| and rel L2; moving the cursor to another
snapshot cancels that work (exclusive worker groups) so the keyboard never
waits on I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.widgets import Footer, Header
from textual.worker import Worker, get_current_worker

from ckptdiff.report import TensorDiff
from ckptdiff.textsafe import printable

from . import fmt
from .history import HistoryModel, SnapshotSummary
from .history_list import HistoryList
from .line_table import LineTable
from .measure import batches, measure
from .table_screen import TableScreen

#: Background work (reading blobs, hashing the whole history) pauses until the
#: user has been idle this long: Python threads share one interpreter lock, and
#: a busy worker would otherwise add its time slices to every keypress.
QUIET_S = 0.3

POLICY_LABEL = {"first": "first snapshot", "previous": "previous snapshot", "marked": "marked snapshot"}


class HistoryScreen(TableScreen):
    BINDINGS = [
        Binding("b", "cycle_base", "Base"),
        Binding("m", "mark", "Mark"),
    ]

    def __init__(self, store_path: str, *, atol: float = 0.0, rtol: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.store_path = store_path
        self.atol, self.rtol = atol, rtol
        self.clock = clock
        self.model: HistoryModel | None = None
        self.policy = "first"
        self.marked: int | None = None
        self.selected: int | None = None
        self.base: int | None = None
        self.loaded_at: float | None = None  # perf_counter when the first table was shown
        #: (snapshot, base) whose rows the table holds; lags (selected, base) while a worker runs.
        self.shown_pair: tuple[int, int] | None = None
        self.shown_at: float | None = None  # perf_counter when shown_pair last changed
        self.last_input = 0.0  # time.monotonic() of the last selection or filter change

    def compose(self):
        yield Header()
        yield HistoryList(id="history")
        yield from self.table_widgets()
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = printable(self.store_path)
        self.set_status(Text("reading the store…", style="italic"))
        self.load_history()

    def on_unmount(self) -> None:
        self.workers.cancel_group(self, "summary")
        self.workers.cancel_group(self, "measure")
        if self.model is not None:
            self.model.handle.close()

    @property
    def history(self) -> HistoryList:
        return self.query_one(HistoryList)

    # -- loading --------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_history(self) -> None:
        model = HistoryModel.load(self.store_path)
        rows: list[TensorDiff] = []
        index = len(model) - 1
        if index >= 0:
            base = model.base_index(index, self.policy, self.marked)
            rows = model.quick_rows(index, base)
        self.app.call_from_thread(self._history_loaded, model, index, rows)

    def _history_loaded(self, model: HistoryModel, index: int, rows: list[TensorDiff]) -> None:
        self.model = model
        if index < 0:
            self.set_status(Text("this store has no snapshots yet: record some with the training hook "
                                 "or `ckptdiff snapshot`", style="yellow"))
            return
        metrics = fmt.metric_columns([s.metrics for s in model.snapshots])
        self.selected = index
        self.base = model.base_index(index, self.policy, self.marked)
        self.history.set_snapshots(model.snapshots, self.clock(), metrics, cursor=index)
        self.history.set_marks(self.base, self.marked)
        self.show_rows(rows)
        self.shown_pair = (index, self.base)
        self.loaded_at = time.perf_counter()
        self.history.focus()
        self.measure_selected(index, self.base, rows)
        self.load_summaries()

    # -- selection and base -----------------------------------------------------

    def on_line_table_highlighted(self, event: LineTable.Highlighted) -> None:
        # Use where the cursor is now, not where the event says: with a key held
        # down, events queue up and only the latest position matters.
        if event.table is self.history and self.model is not None and self.history.row_count:
            self.select(self.history.cursor_row)

    def on_line_table_selected(self, event: LineTable.Selected) -> None:
        if event.table is self.history:
            self.table.focus()  # Enter on a snapshot: go look at its tensors

    def select(self, index: int, *, force: bool = False) -> None:
        assert self.model is not None
        self.last_input = time.monotonic()
        base = self.model.base_index(index, self.policy, self.marked)
        if not force and index == self.selected and base == self.base:
            return
        self.selected, self.base = index, base
        self.history.set_marks(base, self.marked)
        self.load_table(index, base)

    @work(thread=True, exclusive=True, group="table", exit_on_error=False)
    def load_table(self, index: int, base: int) -> None:
        assert self.model is not None
        rows = self.model.quick_rows(index, base)
        if get_current_worker().is_cancelled:
            return
        self.app.call_from_thread(self._table_loaded, index, base, rows)

    def _table_loaded(self, index: int, base: int, rows: list[TensorDiff]) -> None:
        if (index, base) != (self.selected, self.base):
            return
        self.show_rows(rows)
        self.shown_pair = (index, base)
        self.shown_at = time.perf_counter()
        self.measure_selected(index, base, rows)

    @work(thread=True, exclusive=True, group="measure", exit_on_error=False)
    def measure_selected(self, index: int, base: int, rows: list[TensorDiff]) -> None:
        """Fill max |Δ| and rel L2 of the changed tensors, drifted ones first."""
        assert self.model is not None
        worker = get_current_worker()
        rows = sorted(rows, key=lambda r: (not r.drift, r.name))
        todo = [r for r in rows if r.status in ("changed", "pending") and r.max_abs_delta is None]
        if not todo or index == base:
            return
        model = self.model
        old, new = model.open(base), model.open(index)
        done = 0
        try:
            for names in batches(todo, new, old):
                self.wait_for_quiet(worker)
                if worker.is_cancelled:
                    return
                self.app.call_from_thread(self._progress, index, base, done, len(todo))
                got = measure(old, new, names, model.manifest(index, base), atol=self.atol, rtol=self.rtol)
                done += len(names)
                if worker.is_cancelled:
                    return
                self.app.call_from_thread(self._measured, index, base, got)
        finally:
            old.close()
            new.close()
            if not worker.is_cancelled:
                self.app.call_from_thread(self._progress, index, base, None, None)

    def wait_for_quiet(self, worker: Worker) -> None:
        """Block a background worker while the user is pressing keys (or until cancelled)."""
        while not worker.is_cancelled and time.monotonic() - self.last_input < QUIET_S:
            time.sleep(0.05)

    def apply_query(self) -> bool:
        self.last_input = time.monotonic()
        return super().apply_query()

    def _progress(self, index: int, base: int, done: int | None, total: int | None) -> None:
        if (index, base) == (self.selected, self.base):
            self.measuring = None if done is None or total is None else (done, total)
            self.update_status()

    def _measured(self, index: int, base: int, got: list[TensorDiff]) -> None:
        if (index, base) == (self.selected, self.base):
            self.table.update_rows(got)
            self.update_context()
            self.update_status()

    @work(thread=True, exclusive=True, group="summary", exit_on_error=False)
    def load_summaries(self) -> None:
        """The list's 'changed' and 'drift' columns, newest first (those are on screen)."""
        assert self.model is not None
        worker = get_current_worker()
        model, policy, marked = self.model, self.policy, self.marked
        pending: list[tuple[int, SnapshotSummary]] = []
        last = time.perf_counter()
        for i in reversed(range(len(model))):
            if worker.is_cancelled:
                return
            self.wait_for_quiet(worker)
            pending.append((i, model.summary(i, policy, marked)))
            if time.perf_counter() - last > 0.1 or i == 0:
                self.app.call_from_thread(self._summaries, pending, policy, marked)
                pending, last = [], time.perf_counter()

    def _summaries(self, items: list[tuple[int, SnapshotSummary]], policy: str, marked: int | None) -> None:
        if (policy, marked) != (self.policy, self.marked):
            return
        for i, s in items:
            self.history.set_summary(i, s)

    def action_cycle_base(self) -> None:
        if self.model is None or self.selected is None:
            return
        order = ["first", "previous"] + (["marked"] if self.marked is not None else [])
        self.policy = order[(order.index(self.policy) + 1) % len(order)] if self.policy in order else "first"
        note = f"base: {POLICY_LABEL[self.policy]}"
        if self.marked is None and self.policy == "first":
            note += " (press m on a snapshot to mark it as a base)"
        self.notify(note, timeout=3)
        self.select(self.selected, force=True)
        self.load_summaries()

    def set_base_policy(self, policy: str) -> None:
        """For the command palette."""
        if policy == "marked" and self.marked is None:
            self.notify("no snapshot is marked: press m on one first", severity="warning")
            return
        self.policy = policy
        if self.selected is not None:
            self.select(self.selected, force=True)
            self.load_summaries()

    def action_mark(self) -> None:
        if self.model is None or len(self.model) == 0:
            return  # an empty store has no snapshot to mark
        index = self.history.cursor_row
        self.marked = None if self.marked == index else index
        if self.marked is None:
            self.notify(f"unmarked snapshot #{index}", timeout=3)
            if self.policy == "marked":
                self.policy = "first"
        else:
            self.notify(f"marked snapshot #{index}: press b until the base is 'marked' to diff against it",
                        timeout=4)
        if self.selected is not None:
            self.select(self.selected, force=True)
            self.load_summaries()

    def update_context(self) -> None:
        if self.model is None or self.selected is None or self.base is None:
            return
        snaps = self.model.snapshots
        line = Text()
        line.append(_label(self.selected, snaps[self.selected]), style="bold")
        if self.base == self.selected:
            line.append(f"  is the base ({self.policy})", style="magenta")
        else:
            line.append("  vs ")
            line.append(_label(self.base, snaps[self.base]), style="bold magenta")
            line.append(f" ({self.policy})", style="magenta")
        rows = self.table.all_rows.values()
        changed = sum(r.status != "identical" for r in rows)
        drifted = sum(r.drift for r in rows)
        stale = sum(r.stale for r in rows)
        line.append(f"  ·  {len(self.table.all_rows)} tensors, {changed} changed")
        if drifted:
            line.append(f" · ▲ {drifted} frozen drifted", style="bold red")
        if stale:
            line.append(f" · • {stale} stale", style="yellow")
        self.query_one("#context").update(line)

    def open_detail(self, row: TensorDiff) -> None:
        from .detail_screen import DetailScreen
        assert self.model is not None and self.selected is not None and self.base is not None
        self.app.push_screen(DetailScreen(row, model=self.model, index=self.selected, base=self.base,
                                          policy=self.policy, marked=self.marked,
                                          atol=self.atol, rtol=self.rtol))


def _label(i: int, s: object) -> str:
    step = getattr(s, "step", None)
    tag = getattr(s, "tag", None)
    out = f"#{i}"
    if step is not None:
        out += f" step {step}"
    if tag:
        out += f" [{printable(tag)}]"
    return out
