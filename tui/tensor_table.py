"""The tensor table: one row per tensor of a diff, coloured by what went wrong.

It holds every row (a :class:`~ckptdiff.report.TensorDiff`) and shows the
ones its :class:`~ckptdiff.tui.rows.TableQuery` keeps, in the query's order.
Drifted frozen tensors are red and, by default, pulled to the top; trainable
tensors that never moved are yellow, because both are bugs in a training
script that a summary statistic would hide. Rows arrive in two waves (hashes
first, then the engine's numbers), so updates patch cells in place unless the
order depends on the new numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from ckptdiff.report import TensorDiff

from . import fmt
from .rows import SORT_KEYS, TableQuery, merge_measured

#: (column key, header label). The key doubles as the sort key.
COLUMNS = (
    ("flag", "!"),
    ("name", "tensor"),
    ("role", "role"),
    ("status", "status"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("max", "max |Δ|"),
    ("rel", "rel L2"),
    ("hash", "hash"),
)

DRIFT_STYLE = "bold red"
STALE_STYLE = "yellow"
IDENTICAL_STYLE = "dim"


def row_style(r: TensorDiff) -> str:
    if r.drift:
        return DRIFT_STYLE
    if r.stale:
        return STALE_STYLE
    if r.status == "identical":
        return IDENTICAL_STYLE
    return ""


def cells(r: TensorDiff) -> list[Text]:
    style = row_style(r)
    flag = "▲ DRIFT" if r.drift else ("• stale" if r.stale else "")
    if r.status in ("shape_changed", "added", "removed"):
        shape = fmt.pair(fmt.shape(r.shape_old) if r.shape_old is not None else None,
                         fmt.shape(r.shape_new) if r.shape_new is not None else None)
    else:
        shape = fmt.shape(r.shape_new if r.shape_new is not None else r.shape_old)
    values = [
        flag,
        r.name,
        r.role,
        r.status,
        shape,
        fmt.pair(r.dtype_old, r.dtype_new),
        _delta(r, r.max_abs_delta),
        _delta(r, r.rel_l2),
        fmt.short_hash(r.hash_new or r.hash_old),
    ]
    out = [Text(v, style=style) for v in values]
    for i in (6, 7):
        out[i].justify = "right"
    return out


def _delta(r: TensorDiff, x: float | None) -> str:
    if r.status == "pending":
        return "…"
    if x is None and r.status == "identical":
        return "0"  # bitwise equal: the engine skips the arithmetic, the answer is still 0
    return fmt.num(x)


#: Fixed widths for columns whose text arrives later (so nothing is cut off).
WIDTHS = {"flag": 7, "max": 10, "rel": 10, "hash": 10}


class TensorTable(DataTable):
    """Rows of a diff, filtered and sorted by ``query``."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse sort", show=False),
    ]

    class QueryChanged(Message):
        """The order or filter changed from inside the table (header click, sort key)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.query_state = TableQuery()
        self.all_rows: dict[str, TensorDiff] = {}
        self.shown: list[TensorDiff] = []
        self._needs_rebuild = False

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key, width=WIDTHS.get(key))

    # -- data ---------------------------------------------------------------

    def set_rows(self, rows: Iterable[TensorDiff]) -> None:
        """Replace every row (a new snapshot or base), keeping the cursor on the same tensor.

        Raises FilterError like :meth:`rebuild`.
        """
        self.all_rows = {r.name: r for r in rows}
        self.rebuild()

    def update_rows(self, measured: Iterable[TensorDiff]) -> None:
        """Merge engine results; re-order only when the order depends on them."""
        changed: list[TensorDiff] = []
        for m in measured:
            old = self.all_rows.get(m.name)
            new = merge_measured(old, m) if old is not None else m
            self.all_rows[m.name] = new
            changed.append(new)
            if old is not None and (old.drift != new.drift or old.stale != new.stale or old.status != new.status):
                self._needs_rebuild = True
        q = self.query_state
        if self._needs_rebuild or q.sort in ("max", "rel") or q.status or q.drift_only:
            self._needs_rebuild = False
            self.rebuild()
            return
        for r in changed:
            if r.name in self.rows:
                for (key, _), cell in zip(COLUMNS, cells(r)):
                    self.update_cell(r.name, key, cell)
        self.shown = [self.all_rows[r.name] for r in self.shown]

    def rebuild(self, keep_cursor: bool = True) -> None:
        """Apply the query to every row and redraw; raises FilterError on a bad pattern."""
        shown = self.query_state.apply(self.all_rows.values())
        # A cursor on the top row stays on top (that is where drift goes); elsewhere it
        # follows its tensor, so stepping through history keeps the same tensor in view.
        current = self.current_name() if keep_cursor and self.cursor_row > 0 else None
        self.shown = shown
        self.clear()
        for r in shown:
            self.add_row(*cells(r), key=r.name)
        if current is not None and current in self.rows:
            self.move_cursor(row=self.get_row_index(current), animate=False)
        elif shown:
            self.move_cursor(row=0, animate=False)

    def current_name(self) -> str | None:
        if not self.shown or not (0 <= self.cursor_row < len(self.shown)):
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return key.value

    def current(self) -> TensorDiff | None:
        name = self.current_name()
        return self.all_rows.get(name) if name is not None else None

    # -- sorting ------------------------------------------------------------

    def sort_by(self, key: str) -> None:
        """Sort by a column; choosing the current column again reverses it."""
        if key == "flag":
            self.query_state.drift_first = not self.query_state.drift_first
        elif key == self.query_state.sort:
            self.query_state.reverse = not self.query_state.reverse
        else:
            self.query_state.sort, self.query_state.reverse = key, False
        self.rebuild()
        self.post_message(self.QueryChanged())

    def action_cycle_sort(self) -> None:
        i = SORT_KEYS.index(self.query_state.sort)
        self.query_state.sort = SORT_KEYS[(i + 1) % len(SORT_KEYS)]
        self.query_state.reverse = False
        self.rebuild()
        self.post_message(self.QueryChanged())

    def action_reverse_sort(self) -> None:
        self.query_state.reverse = not self.query_state.reverse
        self.rebuild()
        self.post_message(self.QueryChanged())

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(str(event.column_key.value))
