"""SVG snapshots of the main screens (pytest-textual-snapshot).

The data is deterministic (fixed arrays, so fixed hashes), paths are
relative, and times are rendered against an injected clock, so the pictures
only change when the UI does. Regenerate after an intended UI change with
``pytest tests/tui/test_tui_snapshots.py --snapshot-update`` and look at
``snapshot_report.html`` before committing.
"""

from __future__ import annotations

from ckptdiff.tui.app import CkptdiffApp
from tui_helpers import settle

SIZE = (130, 34)


def test_history_screen(history, snap_compare) -> None:
    app = CkptdiffApp(store=history.path, clock=history.clock())
    assert snap_compare(app, terminal_size=SIZE, run_before=settle)


def test_history_drift_only_with_previous_base(history, snap_compare) -> None:
    app = CkptdiffApp(store=history.path, clock=history.clock())

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        app.screen.set_base_policy("previous")
        await pilot.press("k", "d")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_tensor_detail(history, snap_compare) -> None:
    app = CkptdiffApp(store=history.path, clock=history.clock())

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        await pilot.press("tab", "enter")
        await settle(pilot)

    assert snap_compare(app, terminal_size=(130, 44), run_before=run_before)


def test_two_checkpoint_mode(pair_files, snap_compare) -> None:
    old, new, manifest = pair_files
    app = CkptdiffApp(old=old, new=new, manifest=manifest)
    assert snap_compare(app, terminal_size=SIZE, run_before=settle)


def test_help_screen(history, snap_compare) -> None:
    app = CkptdiffApp(store=history.path, clock=history.clock())

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
