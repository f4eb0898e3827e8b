"""The Textual application: history mode (a store) or pair mode (two checkpoints).

The app only picks the first screen and offers app-wide commands (help,
quit, the command palette's entries); the screens own their data and keys.
``clock`` is injectable so tests render fixed relative times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from .help_screen import HelpScreen
from .history_screen import HistoryScreen
from .pair_screen import PairScreen
from .table_screen import TableScreen


class CkptdiffApp(App[None]):
    # The first screen comes from get_default_screen(), whose own CSS_PATH Textual does
    # not load (pushed screens' CSS is), so the app loads those two screens' files.
    CSS_PATH = ["app.tcss", "history_screen.tcss", "pair_screen.tcss"]
    TITLE = "ckptdiff"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(self, *, store: str | None = None, old: str | None = None, new: str | None = None,
                 manifest: str | None = None, atol: float = 0.0, rtol: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        if (store is None) == (old is None or new is None):
            raise ValueError("give either store= or both old= and new=")
        super().__init__()
        self.store_path, self.old, self.new = store, old, new
        self.manifest_path = manifest
        self.atol, self.rtol = atol, rtol
        self.clock = clock

    def get_default_screen(self) -> Screen:
        if self.store_path is not None:
            return HistoryScreen(self.store_path, atol=self.atol, rtol=self.rtol, clock=self.clock)
        assert self.old is not None and self.new is not None
        return PairScreen(self.old, self.new, manifest=self.manifest_path, atol=self.atol, rtol=self.rtol)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("Help", "Keys, filter syntax and what the colours mean", self.action_help)
        if isinstance(screen, TableScreen):
            yield from _table_commands(screen)
        if isinstance(screen, HistoryScreen):
            yield from _history_commands(screen)
        yield from super().get_system_commands(screen)


def _table_commands(screen: TableScreen) -> Iterable[SystemCommand]:
    yield SystemCommand("Drift only", "Show only frozen tensors that changed (toggle)", screen.action_drift_only)
    yield SystemCommand("Jump to first drifted tensor", "Clear filters, put drifted rows on top, select the first",
                        lambda: _jump_to_drift(screen))
    yield SystemCommand("Clear filters", "Show every tensor again", screen.action_clear_filter)
    yield SystemCommand("Filter tensors…", "Open the filter line (glob, re:regex, role:, status:)",
                        screen.action_filter)
    for role in ("frozen", "trainable", "buffer"):
        yield SystemCommand(f"Show only {role} tensors", f"Role filter: {role}",
                            lambda role=role: _set_role(screen, role))
    for key, label in (("max", "max |Δ|"), ("rel", "rel L2"), ("name", "name"), ("status", "status"),
                       ("role", "role"), ("shape", "size"), ("dtype", "dtype"), ("cause", "cause"),
                       ("hash", "hash")):
        yield SystemCommand(f"Sort by {label}", "Again: reverse", lambda key=key: screen.action_sort(key))
    yield SystemCommand("Drifted rows on top (toggle)", "Pull red and yellow rows above the sort order",
                        screen.action_pull_drift)


def _history_commands(screen: HistoryScreen) -> Iterable[SystemCommand]:
    yield SystemCommand("Base: first snapshot", "Diff every snapshot against the first",
                        lambda: screen.set_base_policy("first"))
    yield SystemCommand("Base: previous snapshot", "Diff every snapshot against the one before it",
                        lambda: screen.set_base_policy("previous"))
    yield SystemCommand("Base: marked snapshot", "Diff against the snapshot marked with m",
                        lambda: screen.set_base_policy("marked"))
    yield SystemCommand("Mark snapshot under cursor", "Use it as a base with b", screen.action_mark)


def _set_role(screen: TableScreen, role: str) -> None:
    screen.table.query_state.role = role
    screen.apply_query()


def _jump_to_drift(screen: TableScreen) -> None:
    screen.action_clear_filter()
    table = screen.table
    table.query_state.drift_first = True
    screen.apply_query()
    if table.shown and table.shown[0].drift:
        table.move_cursor(row=0)
        table.focus()
    else:
        screen.notify("no drifted frozen tensor in this diff", timeout=3)
