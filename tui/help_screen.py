"""The ``?`` screen: every key, the filter syntax, and what the colours mean.

Written for someone who opened the TUI without reading any docs: it says
what red and yellow rows are and how to find the layer that drifted.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("↑ ↓  j k", "move in the focused list"),
    ("Tab", "switch between the snapshot list and the tensor table"),
    ("Enter", "tensor: open its detail (history chart, first drift)"),
    ("b", "base: first snapshot → previous snapshot → marked snapshot"),
    ("m", "mark / unmark the snapshot under the cursor (a base for b)"),
    ("d", "show only drifted frozen tensors"),
    ("/", "filter tensors by name, role and status (see below)"),
    ("r  c", "cycle the role filter / the status filter"),
    ("s  S", "sort by the next column / reverse; or click a header"),
    ("p", "pull drifted (red) and stale (yellow) rows to the top, on/off"),
    ("Esc", "clear filters; in a detail screen: back"),
    ("Ctrl+P", "command palette: bases, filters, sorts, jump to drift"),
    ("?  q", "this help / quit"),
)

FILTERS = (
    ("attn", "names containing 'attn'"),
    ("*.weight", "a glob on the whole name"),
    ("re:^enc\\.\\d  or  /…/", "a regular expression (search)"),
    ("role:frozen", "trainable, frozen, buffer, unknown"),
    ("status:changed", "identical, changed, added, removed, shape_changed, dtype_changed, any"),
    ("is:drift  is:stale", "only drifted / only stale tensors"),
)


def _table(rows: tuple[tuple[str, str], ...], title: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None,
              padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help_screen.tcss"
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def compose(self):
        legend = Text.assemble(
            ("Colours  ", "bold"),
            ("▲ red", "bold red"), ": a frozen tensor that changed (drift: the training script moved a layer "
                                   "it meant to freeze).  ",
            ("• yellow", "yellow"), ": a trainable tensor that never changed (not in the optimizer?).  ",
            ("dim", "dim"), ": bitwise identical.",
        )
        with VerticalScroll(id="help"):
            yield Static(_table(KEYS, "Keys"))
            yield Static(_table(FILTERS, "Filter (/): words combine"))
            yield Static(legend)
            yield Static(Text("Numbers: max |Δ| is the largest absolute element change, rel L2 is "
                              "‖new−old‖/‖old‖. Equality is bitwise (BLAKE3 hashes).", style="dim"))
            yield Static(Text("Esc, ? or q closes this help.", style="italic"))
