"""The TUI on awkward input: hostile tensor names, an empty store, a terminal shorter than the history."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save_file

from ckptdiff.tui.app import CkptdiffApp
from ckptdiff.tui.detail_screen import DetailScreen
from ckptdiff.tui.pair_screen import PairScreen
from tui_helpers import run_async, settle

SIZE = (140, 30)
NAMES = ["evil\nname", "cr\rname", "esc\x1b[31mred", "rtl\u202eoverride", "ok.weight"]


@run_async
async def test_control_characters_in_names_cannot_break_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    old = {n: np.full(4, i, np.float32) for i, n in enumerate(NAMES)}
    new = {n: v + 1 for n, v in old.items()}
    save_file(old, "old.safetensors")
    save_file(new, "new.safetensors")
    app = CkptdiffApp(old="old.safetensors", new="new.safetensors")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, PairScreen) and screen.error is None
        table = screen.table
        assert sorted(table.all_rows) == sorted(NAMES)  # the data keeps the real names
        shown = [table.render_line(y).text for y in range(1, len(NAMES) + 1)]
        assert all(line.isprintable() for line in shown), shown
        joined = "\n".join(shown)
        for visible in ("evil\\nname", "cr\\rname", "esc\\x1b[31mred", "rtl\\u202eoverride", "ok.weight"):
            assert visible in joined
        # every row is there, each on its own line, with its numbers (max |Δ| = 1)
        assert all(line.rstrip().endswith(line.split()[-1]) and " 1 " in line for line in shown)
        table.focus()
        table.move_cursor(row=[r.name for r in table.shown].index("evil\nname"))
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, DetailScreen)
        assert app.screen.row.name == "evil\nname" and app.screen.sub_title == "evil\\nname"


@run_async
async def test_mark_on_an_empty_store_does_nothing(tmp_path) -> None:
    from ckptdiff.store import Store
    Store.open(str(tmp_path / "empty"), create=True).close()
    app = CkptdiffApp(store=str(tmp_path / "empty"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("m", "b", "d")
        await settle(pilot)
        assert app.screen.marked is None
        assert "tensor ▲" in app.screen.table.render_line(0).text  # the header is whole, not "tenso…"
        assert "no snapshots yet" in str(app.screen.query_one("#status").render()) or \
            app.screen.table.row_count == 0


@run_async
async def test_newest_snapshot_is_scrolled_into_view_on_a_short_terminal(history) -> None:
    app = CkptdiffApp(store=history.path)
    async with app.run_test(size=(80, 14)) as pilot:
        await settle(pilot)
        lst = app.screen.history
        assert lst.row_count == 6 and lst.cursor_row == 5
        visible = lst.scrollable_content_region.height - 1  # minus the header line
        assert visible < 6  # the list really is shorter than the history
        top = round(lst.scroll_y)
        assert top <= lst.cursor_row < top + visible, (top, visible)
        assert "5" in lst.render_line(lst.cursor_row - top + 1).text.split()[:2]
