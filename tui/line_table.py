"""A fast, read-only table on Textual's line API: the base of both lists in the app.

Why not Textual's DataTable: it measures every cell of every new row with
Rich to size its columns and re-renders every visible cell through Rich
whenever any cell changes. For a 1,000-tensor snapshot that is about half a
second per rebuild, and both lists here change on every step through
history. This table keeps plain strings: column widths are string lengths,
and only the rows on screen become segments, so replacing all rows costs
milliseconds and moving the cursor costs one repaint.

Rows are lists of ``(text, style)`` cells; a row style (drift red, stale
yellow) sits under the cell styles, the cursor on top (except for the cell
styles a subclass lists in ``cursor_keeps``). Subclasses give the
columns and react to :class:`Highlighted` / :class:`Selected` /
:class:`HeaderClicked`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ckptdiff.textsafe import printable

Cell = tuple[str, Style | None]
NO_STYLE = Style()


class _RowMessage(Message):
    """A message about one row of a :class:`LineTable` (by index)."""

    def __init__(self, table: LineTable, index: int) -> None:
        super().__init__()
        self.table, self.index = table, index

    @property
    def control(self) -> LineTable:
        return self.table


class LineTable(ScrollView, can_focus=True):
    """Columns of plain text with a header row, a row cursor, and mouse support."""

    COMPONENT_CLASSES = {
        "line-table--header",
        "line-table--cursor",
        "line-table--even-row",
    }
    BINDINGS = [
        Binding("up,k", "cursor_up", "Up", show=False),
        Binding("down,j", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
    ]

    #: (key, label) per column; set by subclasses or :meth:`set_columns`.
    columns: tuple[tuple[str, str], ...] = ()
    right_aligned: frozenset[str] = frozenset()
    min_width: dict[str, int] = {}
    max_width: dict[str, int] = {}
    #: Cell styles that stay on the cursor row (an alarm such as the red drift marker must not
    #: vanish under the cursor); every other cell takes the cursor's colours.
    cursor_keeps: frozenset[Style] = frozenset()

    cursor_row: reactive[int] = reactive(0, always_update=True)

    class Highlighted(_RowMessage):
        """The cursor moved to ``index``."""

    class Selected(_RowMessage):
        """Enter, or a click on the highlighted row."""

    class HeaderClicked(Message):
        def __init__(self, table: LineTable, key: str) -> None:
            super().__init__()
            self.table, self.key = table, key

        @property
        def control(self) -> LineTable:
            return self.table

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._rows: list[list[Cell]] = []
        self._row_styles: list[Style] = []
        self._widths: list[int] = self._header_widths()

    # -- data ---------------------------------------------------------------

    def set_columns(self, columns: Sequence[tuple[str, str]]) -> None:
        self.columns = tuple(columns)
        self._widths = self._header_widths()

    def set_data(self, rows: list[list[Cell]], row_styles: list[Style] | None = None, *,
                 cursor: int | None = None) -> None:
        """Replace every row; widths follow the longest text of each column."""
        rows = [_printable_row(r) for r in rows]
        self._rows = rows
        self._row_styles = row_styles if row_styles is not None else [NO_STYLE] * len(rows)
        widths = self._header_widths()
        for row in rows:
            for i, (text, _) in enumerate(row):
                n = len(text) if text.isascii() else cell_len(text)
                if n > widths[i]:
                    widths[i] = n
        for i, (key, _) in enumerate(self.columns):
            if key in self.max_width:
                widths[i] = min(widths[i], self.max_width[key])
        self._widths = widths
        resized = self.virtual_size.height != len(rows) + 1
        self.virtual_size = Size(sum(w + 2 for w in widths), len(rows) + 1)
        self.cursor_row = self.cursor_row if cursor is None else cursor
        self.refresh(layout=resized)  # height: auto follows the row count

    def set_row(self, index: int, row: list[Cell], style: Style | None = None) -> None:
        """Change one row in place (widths grow if needed)."""
        row = _printable_row(row)
        self._rows[index] = row
        if style is not None:
            self._row_styles[index] = style
        grew = False
        for i, (text, _) in enumerate(row):
            n = cell_len(text)
            cap = self.max_width.get(self.columns[i][0], n)
            if min(n, cap) > self._widths[i]:
                self._widths[i] = min(n, cap)
                grew = True
        if grew:
            self.virtual_size = Size(sum(w + 2 for w in self._widths), len(self._rows) + 1)
            self.refresh()
        else:
            self.refresh_row(index)

    def cell(self, index: int, key: str) -> Cell:
        return self._rows[index][self.column_index(key)]

    def column_index(self, key: str) -> int:
        return [k for k, _ in self.columns].index(key)

    @property
    def row_count(self) -> int:
        return len(self._rows)

    def _header_widths(self) -> list[int]:
        try:
            labels = self.header_labels()  # with a sort arrow, so an empty table shows "tensor ▲", not "tenso…"
        except AttributeError:  # a subclass's state is not set up yet (called from __init__)
            labels = [label for _, label in self.columns]
        return [max(cell_len(label), self.min_width.get(key, 0)) for (key, _), label in zip(self.columns, labels)]

    def header_labels(self) -> list[str]:
        return [label for _, label in self.columns]

    # -- cursor and scrolling ---------------------------------------------------

    def move_cursor(self, *, row: int, animate: bool = False) -> None:
        self.cursor_row = row

    def validate_cursor_row(self, row: int) -> int:
        return max(0, min(row, len(self._rows) - 1)) if self._rows else 0

    def scroll_to_cursor(self) -> None:
        """Scroll just enough that the cursor row is on screen (and no further than needed)."""
        new = self.cursor_row
        visible = max(1, self.scrollable_content_region.height - 1)
        top = round(self.scroll_y)
        if new < top:
            self.scroll_to(y=new, animate=False)
        elif new >= top + visible:
            self.scroll_to(y=new - visible + 1, animate=False)
        elif top > 0 and top + visible > len(self._rows):
            # Grown taller since we scrolled: show as many rows as fit, the cursor still on screen.
            self.scroll_to(y=max(0, len(self._rows) - visible), animate=False)

    def on_resize(self) -> None:
        # The cursor is often placed before the table's height is laid out (the
        # newest snapshot, on a short terminal, would sit below the fold): once the
        # real height is known, bring it into view.
        self.call_after_refresh(self.scroll_to_cursor)

    def watch_cursor_row(self, old: int, new: int) -> None:
        self.scroll_to_cursor()
        self.refresh_row(old)
        self.refresh_row(new)
        if self._rows:
            self.post_message(self.Highlighted(self, new))

    def refresh_row(self, index: int) -> None:
        y = index - round(self.scroll_y) + 1
        if 1 <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - 2)

    def action_cursor_up(self) -> None:
        self.cursor_row -= 1

    def action_cursor_down(self) -> None:
        self.cursor_row += 1

    def action_page_up(self) -> None:
        self.cursor_row -= self._page()

    def action_page_down(self) -> None:
        self.cursor_row += self._page()

    def action_first(self) -> None:
        self.cursor_row = 0

    def action_last(self) -> None:
        self.cursor_row = len(self._rows) - 1

    def action_select(self) -> None:
        if 0 <= self.cursor_row < len(self._rows):
            self.post_message(self.Selected(self, self.cursor_row))

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # -- mouse ----------------------------------------------------------------

    def column_at(self, x: int) -> str | None:
        """The column key under content x (scroll included)."""
        edge = 0
        for (key, _), w in zip(self.columns, self._widths):
            edge += w + 2
            if x < edge:
                return key
        return None

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        x, y = offset.x + round(self.scroll_x), offset.y
        if y == 0:
            key = self.column_at(x)
            if key is not None:
                self.post_message(self.HeaderClicked(self, key))
            return
        index = round(self.scroll_y) + y - 1
        if 0 <= index < len(self._rows):
            again = index == self.cursor_row
            self.cursor_row = index
            if again or event.chain > 1:
                self.action_select()

    # -- rendering ------------------------------------------------------------

    def _segments(self, cells: Sequence[Cell], style: Style) -> list[Segment]:
        out = []
        for (key, _), w, (text, cell_style) in zip(self.columns, self._widths, cells):
            n = cell_len(text)
            if n > w:
                text = text[: max(0, w - 1)] + "…"
                n = cell_len(text)
            pad = " " * (w - n)
            s = style + cell_style if cell_style is not None else style
            # One segment per cell, padding included: cell styles only set colours
            # and weight, and whole cells keep exported screenshots aligned.
            out.append(Segment(f" {pad}{text} " if key in self.right_aligned else f" {text}{pad} ", s))
        return out

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        scroll_x, scroll_y = round(self.scroll_x), round(self.scroll_y)
        base = self.rich_style
        if y == 0:
            style = base + self.get_component_rich_style("line-table--header")
            segments = self._segments([(label, None) for label in self.header_labels()], style)
        else:
            index = scroll_y + y - 1
            if index >= len(self._rows):
                return Strip.blank(width, base)
            style = base
            if index % 2 == 1:
                style += self.get_component_rich_style("line-table--even-row")
            style += self._row_styles[index]
            cells = self._rows[index]
            if index == self.cursor_row:
                style += self.get_component_rich_style("line-table--cursor")
                cells = [(text, cs if cs in self.cursor_keeps else None) for text, cs in cells]
            segments = self._segments(cells, style)
        return Strip(segments).crop(scroll_x, scroll_x + width).adjust_cell_length(width, style)


def _printable_row(row: list[Cell]) -> list[Cell]:
    """Cells with control characters made visible (a tensor name holding CR, LF or
    an ESC sequence would otherwise break the row or restyle the terminal)."""
    if all(text.isprintable() for text, _ in row):
        return row
    return [(printable(text), style) for text, style in row]

