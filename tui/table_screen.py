"""What the history screen and the two-checkpoint screen share: a filterable tensor table.

Subclasses put something above the table (the snapshot list, or the two
paths) and feed it rows; this class owns the keys that act on the table
(``/`` filter, ``d`` drift only, ``r`` role, ``c`` status, ``p`` drift on
top, Enter for a tensor's detail) and the status line under it.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input, Static
from textual.worker import Worker, WorkerState

from ckptdiff.report import TensorDiff

from .filter_bar import FilterBar
from .rows import ROLE_CHOICES, STATUS_CHOICES, FilterError
from .tensor_table import TensorTable


class TableScreen(Screen):
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("d", "drift_only", "Drift only"),
        Binding("r", "cycle_role", "Role"),
        Binding("c", "cycle_status", "Status"),
        Binding("p", "pull_drift", "Drift on top", show=False),
        Binding("escape", "clear_filter", "Clear filters", show=False),
    ]

    #: Set by subclasses while the engine is still measuring: (done, total).
    measuring: tuple[int, int] | None = None

    @property
    def table(self) -> TensorTable:
        return self.query_one(TensorTable)

    @property
    def filter_bar(self) -> FilterBar:
        return self.query_one(FilterBar)

    def table_widgets(self):  # the common lower half; subclasses yield it in compose()
        yield Static("", id="context")
        yield FilterBar(id="filter")
        yield TensorTable(id="tensors")
        yield Static("", id="status")

    # -- applying the query ---------------------------------------------------

    def apply_query(self) -> bool:
        try:
            self.table.rebuild()
        except FilterError as e:
            self.set_status(Text(f"filter: {e}", style="bold red"))
            return False
        self.update_status()
        return True

    def show_rows(self, rows: list[TensorDiff]) -> None:
        try:
            self.table.set_rows(rows)
        except FilterError as e:
            self.set_status(Text(f"filter: {e}", style="bold red"))
            return
        self.update_status()
        self.update_context()

    def update_context(self) -> None:
        """The line above the table; subclasses say what is compared with what."""

    def set_status(self, text: Text | str) -> None:
        self.query_one("#status", Static).update(text)

    def update_status(self) -> None:
        t = self.table
        line = Text()
        line.append(f"{len(t.shown)} of {len(t.all_rows)} tensors", style="bold")
        line.append(" · " + t.query_state.describe())
        if self.measuring is not None:
            done, total = self.measuring
            line.append(f" · measuring {done}/{total} changed tensors…", style="italic")
        self.set_status(line)

    # -- actions ------------------------------------------------------------

    def action_filter(self) -> None:
        bar = self.filter_bar
        bar.add_class("-open")
        bar.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input is self.filter_bar:
            self.table.query_state.text = event.value
            self.apply_query()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input is self.filter_bar:
            if not event.value:
                self.filter_bar.remove_class("-open")
            self.table.focus()

    def on_filter_bar_dismissed(self, _event: FilterBar.Dismissed) -> None:
        self.filter_bar.remove_class("-open")
        self.table.focus()

    def action_clear_filter(self) -> None:
        """Esc on the table: drop every filter (the sort stays)."""
        q = self.table.query_state
        q.text, q.role, q.status, q.drift_only = "", None, None, False
        with self.filter_bar.prevent(Input.Changed):
            self.filter_bar.value = ""
        self.filter_bar.remove_class("-open")
        self.apply_query()

    def action_drift_only(self) -> None:
        q = self.table.query_state
        q.drift_only = not q.drift_only
        self.apply_query()

    def action_cycle_role(self) -> None:
        q = self.table.query_state
        q.role = ROLE_CHOICES[(ROLE_CHOICES.index(q.role) + 1) % len(ROLE_CHOICES)]
        self.apply_query()

    def action_cycle_status(self) -> None:
        q = self.table.query_state
        cur = q.status if q.status in STATUS_CHOICES else None
        q.status = STATUS_CHOICES[(STATUS_CHOICES.index(cur) + 1) % len(STATUS_CHOICES)]
        self.apply_query()

    def action_pull_drift(self) -> None:
        q = self.table.query_state
        q.drift_first = not q.drift_first
        self.apply_query()

    def action_sort(self, key: str) -> None:
        """For the command palette: sort by a column (again: reverse)."""
        self.table.sort_by(key)

    def on_tensor_table_query_changed(self, _event: TensorTable.QueryChanged) -> None:
        self.update_status()

    def on_tensor_table_selected(self, event: TensorTable.Selected) -> None:
        event.stop()
        self.open_detail(event.row)

    def open_detail(self, row: TensorDiff) -> None:
        raise NotImplementedError

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A worker failed (a damaged blob, a store removed underneath us): say so, keep running."""
        if event.state == WorkerState.ERROR and self.is_attached:
            self.measuring = None
            self.set_status(Text(f"error: {describe_error(event.worker.error)}", style="bold red"))


def describe_error(e: BaseException | None) -> str:
    from ckptdiff.errors import CkptError

    from ckptdiff.textsafe import printable

    if isinstance(e, CkptError):
        return printable(str(e))
    if isinstance(e, OSError):
        return printable(f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}")
    return printable(f"internal error: {type(e).__name__}: {e}")
