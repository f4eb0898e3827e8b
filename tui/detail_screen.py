"""One tensor in depth: its numbers for the current pair, and its whole history.

The history (max |Δ| and rel L2 vs the base at every snapshot, and the first
snapshot where it moved) is computed in a worker by
:meth:`HistoryModel.series`, which answers equal hashes without reading a
blob, so a frozen tensor that drifted late costs a handful of small reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Sparkline, Static
from textual.worker import Worker, WorkerState, get_current_worker

from ckptdiff.cause import evidence, explain, words
from ckptdiff.report import TensorDiff
from ckptdiff.textsafe import printable

from . import fmt
from .history import HistoryModel, SeriesPoint, first_change
from .tensor_table import row_style

POLICY_WORDS = {"first": "the first snapshot", "previous": "the previous snapshot", "marked": "the marked snapshot"}


class DetailScreen(Screen):
    CSS_PATH = "detail_screen.tcss"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("backspace", "app.pop_screen", "Back", show=False),
        Binding("h", "app.pop_screen", "Back", show=False),
    ]

    def __init__(self, row: TensorDiff, *, model: HistoryModel | None = None, index: int | None = None,
                 base: int | None = None, policy: str = "first", marked: int | None = None,
                 atol: float = 0.0, rtol: float = 0.0) -> None:
        super().__init__()
        self.row = row
        self.model = model
        self.index, self.base, self.policy, self.marked = index, base, policy, marked
        self.atol, self.rtol = atol, rtol
        self.points: list[SeriesPoint] | None = None

    def compose(self):
        yield Header()
        with VerticalScroll(id="detail"):
            yield Static(self._info(), id="info")
            if self.model is not None:
                yield Static(Text(f"max |Δ| vs {POLICY_WORDS[self.policy]}, snapshot by snapshot: computing…",
                                  style="italic"), id="chart-title")
                yield Sparkline([], id="chart-max")
                yield Static("rel L2", id="chart-rel-title")
                yield Sparkline([], id="chart-rel")
                yield Static("", id="first-drift")
                yield DataTable(id="points", cursor_type="row", zebra_stripes=True)
            else:
                yield Static(Text("Two-checkpoint mode: no history to chart. Open a store "
                                  "(`ckptdiff tui STORE`) to follow this tensor over time.", style="dim"))
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = printable(self.row.name)
        if self.model is not None:
            table = self.query_one("#points", DataTable)
            for key, label in (("mark", " "), ("index", "#"), ("step", "step"), ("tag", "tag"), ("base", "base"),
                               ("status", "status"), ("max", "max |Δ|"), ("rel", "rel L2"), ("cause", "cause"),
                               ("hash", "hash")):
                table.add_column(label, key=key)
            self.load_series()

    def _info(self) -> Table:
        r = self.row
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        style = row_style(r) or None
        grid.add_row("tensor", Text(printable(r.name), style=style or "bold"))
        verdict = r.status + ("  ▲ DRIFT: a frozen tensor moved" if r.drift else "") + (
            "  • STALE: a trainable tensor never changed" if r.stale else "")
        grid.add_row("status", Text(verdict, style=style))
        grid.add_row("role", r.role)
        grid.add_row("dtype", fmt.dtype_of(r))
        grid.add_row("shape", fmt.shape_of(r))
        grid.add_row("elements", "-" if r.numel is None else f"{r.numel:,}")
        grid.add_row("max |Δ|", fmt.num(r.max_abs_delta))
        grid.add_row("mean |Δ|", fmt.num(r.mean_abs_delta))
        grid.add_row("rel L2", fmt.num(r.rel_l2))
        if r.changed_elements is not None and r.numel:
            grid.add_row("changed", f"{r.changed_elements:,} of {r.numel:,} elements "
                                    f"({100 * r.changed_elements / r.numel:.1f}%)")
        if r.nan_new or r.inf_new:
            grid.add_row("new NaN/Inf", Text(f"{r.nan_new or 0} NaN, {r.inf_new or 0} Inf", style="bold red"))
        if r.cause:
            said = explain(r.cause, r.cause_detail) if r.drift else words(r.cause, r.cause_detail)
            grid.add_row("cause", Text.assemble((r.cause, "bold"), "  ", (said, style or "")))
            grid.add_row("evidence", evidence(r.cause_detail))
        grid.add_row("hash old", r.hash_old or "-")
        grid.add_row("hash new", r.hash_new or "-")
        return grid

    @work(thread=True, exclusive=True, group="series", exit_on_error=False)
    def load_series(self) -> None:
        assert self.model is not None
        worker = get_current_worker()
        points = self.model.series(self.row.name, self.policy, self.marked, atol=self.atol, rtol=self.rtol,
                                   cancelled=lambda: worker.is_cancelled)
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_series, points)

    def _show_series(self, points: list[SeriesPoint]) -> None:
        assert self.model is not None
        self.points = points
        maxes = [_finite(p.diff.max_abs_delta) if p.diff else 0.0 for p in points]
        rels = [_finite(p.diff.rel_l2) if p.diff else 0.0 for p in points]
        steps = [self.model.snapshots[p.index].step for p in points]
        self.query_one("#chart-max", Sparkline).data = by_step(steps, maxes)
        self.query_one("#chart-rel", Sparkline).data = by_step(steps, rels)
        peak = max(maxes, default=0.0)
        self.query_one("#chart-title", Static).update(Text.assemble(
            (f"max |Δ| vs {POLICY_WORDS[self.policy]}", "bold"),
            f", over {len(points)} snapshots (peak {fmt.num(peak)}):"))
        self.query_one("#chart-rel-title", Static).update(Text.assemble(
            ("rel L2", "bold"), f" (peak {fmt.num(max(rels, default=0.0))}):"))
        first = first_change(points)
        snaps = self.model.snapshots
        if first is None:
            msg = Text("never differs from its base in any snapshot", style="green")
        else:
            s = snaps[first.index]
            what = "first drifted" if self.row.role == "frozen" else "first changed"
            msg = Text.assemble((f"{what} at snapshot #{first.index}", "bold red" if self.row.role == "frozen"
                                 else "bold"),
                                f" (step {s.step})" if s.step is not None else "",
                                f" [{s.tag}]" if s.tag else "",
                                f", vs #{first.base_index}")
        self.query_one("#first-drift", Static).update(msg)
        table = self.query_one("#points", DataTable)
        table.clear()
        for p in points:
            s = snaps[p.index]
            d = p.diff
            style = ""
            if p.status not in ("identical", "absent") and p.index != p.base_index:
                style = "bold red" if self.row.role == "frozen" else ""
            mark = "◀" if p.index == self.index else ""
            table.add_row(mark, str(p.index), "-" if s.step is None else str(s.step), s.tag or "",
                          f"#{p.base_index}", Text(p.status, style=style),
                          Text(fmt.num(d.max_abs_delta) if d else ("0" if p.status == "identical" else "-"),
                               style=style, justify="right"),
                          Text(fmt.num(d.rel_l2) if d else ("0" if p.status == "identical" else "-"),
                               style=style, justify="right"),
                          Text((d.cause or "") if d else "", style=style),
                          fmt.short_hash(p.hash), key=str(p.index))
        if self.index is not None:
            table.move_cursor(row=self.index, animate=False)


    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            from .table_screen import describe_error
            self.query_one("#chart-title", Static).update(
                Text(f"error: {describe_error(event.worker.error)}", style="bold red"))


#: Samples of a chart spaced by step: several per column of any terminal, so a snapshot
#: stands where its step falls, not at its place in the list.
CHART_SAMPLES = 240


def by_step(steps: Sequence[int | None], values: Sequence[float], samples: int = CHART_SAMPLES) -> list[float]:
    """``values`` resampled on an even grid of steps, each sample holding the value of the last
    snapshot at or before it (between two snapshots nothing was measured).

    Snapshots without a step, or out of step order, keep one sample each, evenly spaced.
    """
    known = [s for s in steps if s is not None]
    if len(values) < 2 or len(known) != len(steps) or any(b <= a for a, b in zip(known, known[1:])):
        return list(values)
    first, last = known[0], known[-1]
    out: list[float] = []
    k = 0
    for i in range(samples):
        at = first + (last - first) * i / (samples - 1)
        while k + 1 < len(known) and known[k + 1] <= at:
            k += 1
        out.append(values[k])
    return out


def _finite(x: float | None) -> float:
    if x is None or not math.isfinite(x):
        return 0.0 if x is None or x != x else 1e300
    return float(x)
