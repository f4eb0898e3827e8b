"""Pilot-driven tests of history mode on a real store with planted drift."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ckptdiff.tui.app import CkptdiffApp
from ckptdiff.tui.detail_screen import CHART_SAMPLES, DetailScreen, by_step
from ckptdiff.tui.help_screen import HelpScreen
from ckptdiff.tui.history_list import HistoryList
from ckptdiff.tui.history_screen import HistoryScreen
from ckptdiff.tui.tensor_table import DRIFT_STYLE, STALE_STYLE
from tui_helpers import DRIFT_FROM, N_SNAPSHOTS, max_abs64, rel_l264, run_async, settle

SIZE = (140, 40)


def app_for(history) -> CkptdiffApp:  # type: ignore[no-untyped-def]
    return CkptdiffApp(store=history.path, clock=history.clock())


def cell_style(screen: HistoryScreen, name: str, column: int = 1) -> str:
    return str(screen.table.row_cells(name)[column].style)


@run_async
async def test_first_screen_shows_latest_vs_first_with_drift_on_top(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, HistoryScreen)
        hl = screen.query_one(HistoryList)
        assert hl.row_count == N_SNAPSHOTS
        assert (screen.selected, screen.base) == (N_SNAPSHOTS - 1, 0)
        assert hl.cursor_row == N_SNAPSHOTS - 1
        names = [r.name for r in screen.table.shown]
        # union of both sides: old.proj (removed) and lora.A (added) included
        assert sorted(names) == sorted(set(history.arrays[0]) | set(history.arrays[-1]))
        # drifted frozen rows first, red: the drifting weight and the removed frozen tensor
        drifted = [r.name for r in screen.table.shown if r.drift]
        assert set(drifted) == {"backbone.0.weight", "old.proj"}
        assert names[: len(drifted)] == drifted
        for name in drifted:
            assert cell_style(screen, name) == DRIFT_STYLE
        # the trainable tensor nobody updated is stale and yellow, right after the drift
        assert names[len(drifted)] == "head.bias"
        assert screen.table.all_rows["head.bias"].stale
        assert cell_style(screen, "head.bias") == STALE_STYLE
        assert "2 frozen drifted" in str(screen.query_one("#context").render())
        # the history list's drift column came from hashes for every snapshot
        for i in range(N_SNAPSHOTS):
            s = hl.summaries[i]
            assert s.drifted_vs_base == (0 if i < DRIFT_FROM else 1) + (1 if i >= 4 else 0)


@run_async
async def test_engine_numbers_match_numpy_float64(history) -> None:
    app = app_for(history)
    first, last = history.arrays[0], history.arrays[-1]
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        rows = app.screen.table.all_rows
        for name in ("backbone.0.weight", "head.weight", "bn.running_mean"):
            r = rows[name]
            assert r.status == "changed"
            assert r.max_abs_delta == pytest.approx(max_abs64(first[name], last[name]), rel=1e-12)
            if name != "bn.running_mean":  # all zeros at first: rel L2 is inf
                assert r.rel_l2 == pytest.approx(rel_l264(first[name], last[name]), rel=1e-9)
        assert rows["bn.running_mean"].rel_l2 == float("inf")
        assert rows["backbone.1.weight"].status == "identical"
        assert rows["lora.A"].status == "added" and rows["old.proj"].status == "removed"
        assert app.screen.measuring is None


@run_async
async def test_navigate_with_k_j_and_arrows_changes_the_diffed_snapshot(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        for _ in range(N_SNAPSHOTS - DRIFT_FROM):
            await pilot.press("k")
        await settle(pilot)
        assert screen.selected == DRIFT_FROM - 1
        assert not any(r.drift for r in screen.table.all_rows.values())
        assert screen.table.all_rows["head.weight"].max_abs_delta == pytest.approx(
            max_abs64(history.arrays[0]["head.weight"], history.arrays[DRIFT_FROM - 1]["head.weight"]))
        await pilot.press("j")
        await settle(pilot)
        assert screen.selected == DRIFT_FROM
        assert screen.table.all_rows["backbone.0.weight"].drift
        await pilot.press("down", "down")
        await settle(pilot)
        assert screen.selected == DRIFT_FROM + 2
        await pilot.press("up")
        await settle(pilot)
        assert screen.selected == DRIFT_FROM + 1


@run_async
async def test_base_cycles_first_previous_marked(history) -> None:
    app = app_for(history)
    a = history.arrays
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert screen.policy == "first"
        await pilot.press("b")
        await settle(pilot)
        last = N_SNAPSHOTS - 1
        assert (screen.policy, screen.base) == ("previous", last - 1)
        r = screen.table.all_rows["head.weight"]
        assert r.max_abs_delta == pytest.approx(max_abs64(a[last - 1]["head.weight"], a[last]["head.weight"]))
        # without a mark, b goes back to the first snapshot
        await pilot.press("b")
        await settle(pilot)
        assert (screen.policy, screen.base) == ("first", 0)
        # mark snapshot #1, come back to the last one and cycle to the marked base
        for _ in range(last - 1):
            await pilot.press("k")
        await pilot.press("m")
        assert screen.marked == 1
        for _ in range(last - 1):
            await pilot.press("j")
        await pilot.press("b", "b")
        await settle(pilot)
        assert (screen.policy, screen.base, screen.selected) == ("marked", 1, last)
        assert screen.table.all_rows["head.weight"].max_abs_delta == pytest.approx(
            max_abs64(a[1]["head.weight"], a[last]["head.weight"]))
        # the list flags base and mark
        text, _style = screen.query_one(HistoryList).cell(1, "mark")
        assert text == "◆★"
        assert screen.query_one(HistoryList).cell(0, "mark")[0] == ""


@run_async
async def test_previous_base_shows_when_drift_happens(history) -> None:
    """With base = previous, snapshots before the drift are clean and later ones each drift a little."""
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        await pilot.press("b")
        await settle(pilot)
        hl = screen.query_one(HistoryList)
        drift_by_snapshot = [hl.summaries[i].drifted_vs_base for i in range(N_SNAPSHOTS)]
        assert drift_by_snapshot == [0, 0, 0, 1, 2, 1]  # #4 also removes the frozen old.proj


@run_async
async def test_filter_glob_regex_substring_role_and_bad_regex(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        await pilot.press("tab")
        await pilot.press("slash")
        assert screen.filter_bar.has_focus
        await pilot.press(*"head")
        assert sorted(r.name for r in screen.table.shown) == ["head.bias", "head.weight"]
        screen.filter_bar.value = "*.weight"
        await pilot.pause()
        assert sorted(r.name for r in screen.table.shown) == [
            "backbone.0.weight", "backbone.1.weight", "head.weight"]
        screen.filter_bar.value = r"re:^backbone\.\d\.b"
        await pilot.pause()
        assert [r.name for r in screen.table.shown] == ["backbone.0.bias"]
        screen.filter_bar.value = "role:frozen status:identical"
        await pilot.pause()
        assert sorted(r.name for r in screen.table.shown) == ["backbone.0.bias", "backbone.1.weight"]
        screen.filter_bar.value = "re:(["
        await pilot.pause()
        assert "bad regex" in str(screen.query_one("#status").render())
        await pilot.press("escape")
        await pilot.pause()
        assert screen.table.has_focus
        assert len(screen.table.shown) == len(screen.table.all_rows)


@run_async
async def test_drift_only_role_and_status_cycles(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        await pilot.press("d")
        assert {r.name for r in screen.table.shown} == {"backbone.0.weight", "old.proj"}
        await pilot.press("d", "r")
        assert screen.table.query_state.role == "frozen"
        assert {r.role for r in screen.table.shown} == {"frozen"}
        await pilot.press("r")
        assert {r.role for r in screen.table.shown} == {"trainable"}
        await pilot.press("r", "r", "r", "c")  # role back to all; status: anything not identical
        assert screen.table.query_state.role is None
        assert {r.status for r in screen.table.shown} == {"changed", "added", "removed"}
        await pilot.press("c")
        assert {r.status for r in screen.table.shown} == {"identical"}
        await pilot.press("escape")
        assert len(screen.table.shown) == len(screen.table.all_rows)


@run_async
async def test_sort_by_key_and_by_clicking_headers(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        table = screen.table
        await pilot.press("p")  # no drift-first grouping: pure column order
        await pilot.press("tab")
        assert table.has_focus
        await pilot.press("s")
        assert table.query_state.sort == "role"
        roles = [r.role for r in table.shown]
        assert roles == sorted(roles)
        table.sort_by("max")
        known = [r.max_abs_delta for r in table.shown if r.max_abs_delta is not None]
        assert known == sorted(known, reverse=True) and known[0] > 0
        assert table.shown[0].name == "bn.num_batches_tracked"  # 0 -> 50 is the largest move
        # click the "tensor" header: name order, then again: reversed
        await pilot.click(table, offset=(header_x(table, "name"), 0))
        names = [r.name for r in table.shown]
        assert names == sorted(names)
        await pilot.click(table, offset=(header_x(table, "name"), 0))
        names = [r.name for r in table.shown]
        assert names == sorted(names, reverse=True)
        await pilot.press("S")
        assert [r.name for r in table.shown] == sorted(names)


def header_x(table, key: str) -> int:  # type: ignore[no-untyped-def]
    """x offset of column ``key``'s header cell inside the table."""
    index = table.column_index(key)
    x = sum(w + 2 for w in table._widths[:index]) + 1
    assert table.column_at(x) == key
    return x


@run_async
async def test_detail_screen_history_of_a_drifted_tensor(history) -> None:
    app = app_for(history)
    a = history.arrays
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        await pilot.press("tab")
        assert screen.table.current_name() == "backbone.0.weight"
        await pilot.press("enter")
        await settle(pilot)
        detail = app.screen
        assert isinstance(detail, DetailScreen)
        points = detail.points
        assert points is not None and len(points) == N_SNAPSHOTS
        expected = [max_abs64(a[0]["backbone.0.weight"], a[i]["backbone.0.weight"]) for i in range(N_SNAPSHOTS)]
        got = [p.diff.max_abs_delta if p.diff else 0.0 for p in points]
        assert got == pytest.approx(expected, rel=1e-12)
        assert got[:DRIFT_FROM] == [0.0] * DRIFT_FROM and all(g > 0 for g in got[DRIFT_FROM:])
        from textual.widgets import Sparkline
        assert list(detail.query_one("#chart-max", Sparkline).data) == pytest.approx(by_step(history.steps, expected))
        text = str(detail.query_one("#first-drift").render())
        assert f"first drifted at snapshot #{DRIFT_FROM}" in text and f"step {history.steps[DRIFT_FROM]}" in text
        await pilot.press("escape")
        assert isinstance(app.screen, HistoryScreen)


@run_async
async def test_detail_series_skips_unchanged_snapshots_by_hash(history, monkeypatch) -> None:
    """Equal hashes never reach the engine: only distinct changed pairs are measured."""
    import ckptdiff.tui.measure as measure_mod

    calls: list[list[str]] = []
    real = measure_mod.measure

    def counting(old, new, names, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(names))
        return real(old, new, names, *args, **kwargs)

    monkeypatch.setattr(measure_mod, "measure", counting)
    from ckptdiff.tui.history import HistoryModel
    model = HistoryModel.load(history.path)
    points = model.series("backbone.0.bias", "first", None)
    assert [p.status for p in points] == ["identical"] * N_SNAPSHOTS and calls == []
    points = model.series("backbone.0.weight", "first", None)
    assert len(calls) == N_SNAPSHOTS - DRIFT_FROM
    assert points[-1].diff is not None and points[-1].diff.drift


@run_async
async def test_help_screen_and_quit(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, HistoryScreen)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


@run_async
async def test_command_palette_offers_bases_and_jump_to_drift(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        commands = {c.title: c for c in app.get_system_commands(screen)}
        for title in ("Base: previous snapshot", "Drift only", "Jump to first drifted tensor", "Sort by max |Δ|",
                      "Show only frozen tensors", "Help"):
            assert title in commands
        commands["Base: previous snapshot"].callback()
        await settle(pilot)
        assert (screen.policy, screen.base) == ("previous", N_SNAPSHOTS - 2)
        commands["Show only frozen tensors"].callback()
        assert {r.role for r in screen.table.shown} == {"frozen"}
        commands["Jump to first drifted tensor"].callback()
        await pilot.pause()
        assert screen.table.has_focus and screen.table.current().drift
        # through the real palette UI too
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"drift only")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        assert screen.table.query_state.drift_only
        assert all(r.drift for r in screen.table.shown)


@run_async
async def test_mouse_click_selects_a_snapshot(history) -> None:
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        # row 0 of the list sits under its header line
        await pilot.click(HistoryList, offset=(6, 2))
        await settle(pilot)
        assert screen.selected == 1


@run_async
async def test_empty_store_says_so(tmp_path) -> None:
    from ckptdiff.store import Store
    Store.open(str(tmp_path / "empty"), create=True).close()
    app = CkptdiffApp(store=str(tmp_path / "empty"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "no snapshots yet" in str(app.screen.query_one("#status").render())


def test_quick_rows_agree_with_the_engine(history) -> None:
    """The hash-only first picture and the engine's report agree on every status/drift/stale."""
    from ckptdiff.tui.history import HistoryModel

    from ckptdiff import diff

    model = HistoryModel.load(history.path)
    last = len(model) - 1
    quick = {r.name: r for r in model.quick_rows(last, 0)}
    with model.open(0) as old, model.open(last) as new:
        report = diff(old, new, manifest=model.manifest(last))
    assert set(quick) == {t.name for t in report.tensors}
    for t in report.tensors:
        q = quick[t.name]
        assert (q.status, q.role, q.drift, q.stale) == (t.status, t.role, t.drift, t.stale), t.name
    assert np.isfinite(sum(t.max_abs_delta or 0 for t in report.tensors))


@run_async
async def test_a_damaged_blob_is_reported_not_fatal(history) -> None:
    """Corrupt the blob of a changed tensor: the status line says so and the app keeps working."""
    import os

    from ckptdiff.store import Store
    with Store.open(history.path) as store:
        h = store.entries("latest")["head.weight"].hash
        blob = store.blobs.path(h)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(0)
        f.write(b"\xff" * 16)
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        status = str(screen.query_one("#status").render())
        assert "error:" in status and "store" in status, status
        # the hash-only table is still there and the keyboard still works
        assert screen.table.all_rows["backbone.0.weight"].drift
        await pilot.press("k")
        await settle(pilot)
        assert screen.selected == N_SNAPSHOTS - 2


def test_the_chart_spaces_snapshots_by_step() -> None:
    """Snapshots at steps 0, 10 and 100: the jump at step 10 sits a tenth of the way along."""
    values = by_step([0, 10, 100], [0.0, 1.0, 2.0])
    assert len(values) == CHART_SAMPLES
    first_one, first_two = values.index(1.0), values.index(2.0)
    assert first_one == math.ceil((CHART_SAMPLES - 1) / 10)  # the first sample at or past step 10
    assert first_two == CHART_SAMPLES - 1 and values[:first_one] == [0.0] * first_one
    # without steps (or out of order) each snapshot keeps one evenly spaced sample
    assert by_step([0, None, 100], [0.0, 1.0, 2.0]) == [0.0, 1.0, 2.0]
    assert by_step([0, 50, 50], [0.0, 1.0, 2.0]) == [0.0, 1.0, 2.0]


def test_per_tensor_metrics_are_never_a_column() -> None:
    from ckptdiff.tui import fmt

    per_tensor = {f"drift_max_abs/layers.{i}.weight": 1e-4 for i in range(61)}
    assert fmt.metric_columns([per_tensor, per_tensor, {"loss": 1.0, **per_tensor}]) == ["loss"]
    assert fmt.metric_columns([per_tensor]) == []


@run_async
async def test_the_drift_marker_stays_red_on_the_cursor_row(history) -> None:
    """In the snapshot list and in the tensor table: the cursor's colours cover the row, not the alarm."""
    app = app_for(history)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        hl = app.screen.query_one(HistoryList)
        assert hl.cursor_row == N_SNAPSHOTS - 1 and hl.summaries[hl.cursor_row].drifted_vs_base

        def marker_colours(row: int) -> tuple[str, str]:
            strip = hl.render_line(row - round(hl.scroll_y) + 1)
            seg = next(seg for seg in strip if "▲" in seg.text)
            return seg.style.color.name, seg.style.bgcolor.name

        on_cursor = marker_colours(hl.cursor_row)
        off_cursor = marker_colours(hl.cursor_row - 1)
        assert on_cursor[0] == off_cursor[0] == "red"
        assert on_cursor[1] != off_cursor[1]  # still the cursor row: its background stays
        # the tensor table's "▲ DRIFT" flag, on its cursor row (the top row: drift comes first)
        table = app.screen.table
        assert table.cursor_row == 0 and table.shown[0].drift
        strip = table.render_line(1 - round(table.scroll_y))
        flag = next(seg for seg in strip if "▲ DRIFT" in seg.text)
        name = next(seg for seg in strip if table.shown[0].name in seg.text)
        assert flag.style.color.name == "red" and name.style.color.name != "red"
