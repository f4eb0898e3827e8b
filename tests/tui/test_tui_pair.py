"""Two-checkpoint mode: files (hash-less, measured by the engine) and store refs."""

from __future__ import annotations

import pytest
from ckptdiff.tui.app import CkptdiffApp
from ckptdiff.tui.detail_screen import DetailScreen
from ckptdiff.tui.pair_screen import PairScreen
from ckptdiff.tui.tensor_table import DRIFT_STYLE
from tui_helpers import max_abs64, rel_l264, run_async, settle

SIZE = (140, 36)


@run_async
async def test_two_files_with_a_manifest(pair_files, tmp_path) -> None:
    from tui_helpers import history_arrays
    old, new, manifest = pair_files
    a = history_arrays()
    app = CkptdiffApp(old=old, new=new, manifest=manifest)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, PairScreen) and screen.error is None
        rows = screen.table.all_rows
        assert sorted(rows) == sorted(set(a[0]) | set(a[-1]))
        assert all(r.status != "pending" for r in rows.values())
        w = rows["backbone.0.weight"]
        assert w.drift and w.role == "frozen"
        assert w.max_abs_delta == pytest.approx(max_abs64(a[0]["backbone.0.weight"], a[-1]["backbone.0.weight"]),
                                                rel=1e-12)
        assert w.rel_l2 == pytest.approx(rel_l264(a[0]["backbone.0.weight"], a[-1]["backbone.0.weight"]), rel=1e-9)
        assert str(screen.table.row_cells("backbone.0.weight")[1].style) == DRIFT_STYLE
        assert screen.table.shown[0].drift
        assert rows["head.bias"].stale
        await pilot.press("d")
        assert {r.name for r in screen.table.shown} == {"backbone.0.weight", "old.proj"}
        chosen = screen.table.current_name()
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, DetailScreen)
        assert app.screen.row is rows[chosen] and app.screen.sub_title == chosen
        from textual.widgets import Static
        texts = " ".join(str(w.render()) for w in app.screen.query(Static))
        assert "Two-checkpoint mode" in texts
        await pilot.press("escape")
        assert isinstance(app.screen, PairScreen)


@run_async
async def test_two_files_without_manifest_roles_unknown(pair_files) -> None:
    old, new, _ = pair_files
    app = CkptdiffApp(old=old, new=new)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        rows = app.screen.table.all_rows
        assert {r.role for r in rows.values()} == {"unknown"}
        assert not any(r.drift or r.stale for r in rows.values())
        assert "no manifest" in str(app.screen.query_one("#context").render())


@run_async
async def test_store_refs_use_the_recorded_hashes(history) -> None:
    app = CkptdiffApp(old=f"{history.path}@first", new=f"{history.path}@latest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        rows = app.screen.table.all_rows
        assert rows["backbone.0.weight"].drift  # the store's manifest applies
        assert rows["backbone.1.weight"].status == "identical"
        assert rows["head.weight"].max_abs_delta == pytest.approx(
            max_abs64(history.arrays[0]["head.weight"], history.arrays[-1]["head.weight"]))


@run_async
async def test_a_file_that_breaks_after_start_is_reported_in_the_app(pair_files) -> None:
    """The CLI checks inputs first; if a file is damaged anyway the app says so instead of crashing."""
    old, new, _ = pair_files
    with open(new, "wb") as f:
        f.write(b"PK\x03\x04 this is not a zip")
    app = CkptdiffApp(old=old, new=new)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.screen.error is not None
        assert "error:" in str(app.screen.query_one("#status").render())
