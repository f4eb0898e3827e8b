"""The tensor table: one row per tensor of a diff, coloured by what went wrong.

It holds every row (a :class:`~ckptdiff.report.TensorDiff`) and shows the
ones its :class:`~ckptdiff.tui.rows.TableQuery` keeps, in the query's order.
Drifted frozen tensors are red and, by default, pulled to the top; trainable
tensors that never moved are yellow, because both are bugs in a training
script that a summary statistic would hide.

It is a :class:`~ckptdiff.tui.line_table.LineTable` (not a DataTable), so
rebuilding it for another snapshot costs milliseconds at 1,000 tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.message import Message

from ckptdiff.report import TensorDiff

from . import fmt
from .line_table import Cell, LineTable
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
    ("cause", "cause"),
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


def _delta(r: TensorDiff, x: float | None) -> str:
    if r.status == "pending":
        return "…"
    if x is None and r.status == "identical":
        return "0"  # bitwise equal: the engine skips the arithmetic, the answer is still 0
    return fmt.num(x)


def cell_texts(r: TensorDiff) -> list[str]:
    """The row's cells as plain strings, in COLUMNS order."""
    return [
        "▲ DRIFT" if r.drift else ("• stale" if r.stale else ""),
        r.name,
        r.role,
        r.status,
        fmt.shape_of(r),
        fmt.dtype_of(r),
        _delta(r, r.max_abs_delta),
        _delta(r, r.rel_l2),
        "…" if r.status == "pending" else (r.cause or ""),
        fmt.short_hash(r.hash_new or r.hash_old),
    ]


def cells(r: TensorDiff) -> list[Text]:
    """The row's cells as styled Text (what a test or an export sees)."""
    style = row_style(r)
    return [Text(v, style=style) for v in cell_texts(r)]


#: The "▲ DRIFT" flag's own style: it stays red on the cursor row, where the row's red does not.
DRIFT_FLAG = Style.parse(DRIFT_STYLE)


def _flagged(texts: list[str], drift: bool) -> list[Cell]:
    return [(t, DRIFT_FLAG if drift and i == 0 else None) for i, t in enumerate(texts)]


class TensorTable(LineTable):
    """Rows of a diff, filtered and sorted by ``query_state``."""

    columns = COLUMNS
    right_aligned = frozenset({"max", "rel"})
    cursor_keeps = frozenset({DRIFT_FLAG})
    #: Columns whose text arrives later get room up front, so the layout does not jump.
    min_width = {"flag": 7, "max": 9, "rel": 9, "cause": 13, "hash": 10}
    max_width = {"name": 72}

    BINDINGS = [
        Binding("enter", "select", "Detail"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse sort", show=False),
    ]

    class Selected(Message):
        """Enter or a click on the highlighted row: open this tensor."""

        def __init__(self, table: TensorTable, row: TensorDiff) -> None:
            super().__init__()
            self.table = table
            self.row = row

        @property
        def control(self) -> TensorTable:
            return self.table

    class QueryChanged(Message):
        """The order or filter changed from inside the table (header click, sort key)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.query_state = TableQuery()
        self._widths = self._header_widths()  # now with the sort arrow: "tensor ▲" even with no rows
        self.all_rows: dict[str, TensorDiff] = {}
        self.shown: list[TensorDiff] = []

    # -- data ---------------------------------------------------------------

    def set_rows(self, rows: Iterable[TensorDiff]) -> None:
        """Replace every row (a new snapshot or base); raises FilterError like :meth:`rebuild`."""
        self.all_rows = {r.name: r for r in rows}
        self.rebuild()

    def update_rows(self, measured: Iterable[TensorDiff]) -> None:
        """Merge the engine's results into the rows it measured."""
        for m in measured:
            old = self.all_rows.get(m.name)
            self.all_rows[m.name] = merge_measured(old, m) if old is not None else m
        self.rebuild()

    def rebuild(self) -> None:
        """Apply the query to every row and redraw; raises FilterError on a bad pattern.

        A cursor on the top row stays on top (that is where drift goes);
        elsewhere it follows its tensor, so stepping through history keeps
        the same tensor in view.
        """
        shown = self.query_state.apply(self.all_rows.values())
        current = self.current_name() if self.cursor_row > 0 else None
        self.shown = shown
        index = 0
        if current is not None:
            for i, r in enumerate(shown):
                if r.name == current:
                    index = i
                    break
        styles = {s: Style.parse(s) if s else Style() for s in ("", DRIFT_STYLE, STALE_STYLE, IDENTICAL_STYLE)}
        self.set_data([_flagged(cell_texts(r), r.drift) for r in shown],
                      [styles[row_style(r)] for r in shown], cursor=index)

    def row_cells(self, name: str) -> list[Text]:
        return cells(self.all_rows[name])

    def current_name(self) -> str | None:
        r = self.current()
        return r.name if r is not None else None

    def current(self) -> TensorDiff | None:
        if 0 <= self.cursor_row < len(self.shown):
            return self.shown[self.cursor_row]
        return None

    def header_labels(self) -> list[str]:
        q = self.query_state
        labels = []
        for key, label in self.columns:
            if key == q.sort:
                descending = q.reverse != (key in self.right_aligned)
                label += " ▼" if descending else " ▲"
            labels.append(label)
        return labels

    # -- events -----------------------------------------------------------------

    def action_select(self) -> None:
        row = self.current()
        if row is not None:
            self.post_message(self.Selected(self, row))

    def on_line_table_header_clicked(self, event: LineTable.HeaderClicked) -> None:
        event.stop()
        self.sort_by(event.key)

    def on_line_table_highlighted(self, event: LineTable.Highlighted) -> None:
        event.stop()  # nobody above needs tensor-cursor moves

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
