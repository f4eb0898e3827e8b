"""Two-checkpoint mode: the tensor table of one diff (files or ``DIR@REF``s).

Names, shapes and dtypes are known from the headers, so the table appears
before any tensor is read (same-layout pairs show ``pending``; when both
sides are store snapshots their hashes settle identical/changed at once).
The engine then measures in batches in a worker, and the rows fill in.
"""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.widgets import Footer, Header
from textual.worker import Worker, WorkerState, get_current_worker

from ckptdiff.manifest import Manifest
from ckptdiff.policy import hash_rows
from ckptdiff.report import TensorDiff
from ckptdiff.textsafe import printable

from .measure import pair_manifest, refine
from .table_screen import TableScreen, describe_error


class PairScreen(TableScreen):

    def __init__(self, old: str, new: str, *, manifest: str | None = None,
                 atol: float = 0.0, rtol: float = 0.0) -> None:
        super().__init__()
        self.old_spec, self.new_spec = old, new
        self.manifest_path = manifest
        self.atol, self.rtol = atol, rtol
        self.manifest: Manifest | None = None
        self.error: str | None = None

    def compose(self):
        yield Header()
        yield from self.table_widgets()
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = printable(f"{self.old_spec} → {self.new_spec}")
        self.set_status(Text("reading headers…", style="italic"))
        self.update_context()
        self.table.focus()
        self.run_diff()

    @work(thread=True, exclusive=True, group="diff", exit_on_error=False)
    def run_diff(self) -> None:
        """Open both sides, show the header-level table, then let the engine measure."""
        from ckptdiff.resolve import opened

        worker = get_current_worker()
        with opened(self.old_spec, self.new_spec) as (old, new):
            manifest = pair_manifest(old, new, self.manifest_path)
            rows = hash_rows(old, new, manifest)
            self.app.call_from_thread(self._headers_read, rows, manifest)

            def starting(done: int, total: int) -> None:
                self.app.call_from_thread(self._progress, done, total)

            # refine reads a batch only when asked for the next one: stop asking once cancelled
            measured = refine(rows, old, new, manifest, atol=self.atol, rtol=self.rtol, starting=starting)
            while not worker.is_cancelled:
                got = next(measured, None)
                if got is None:
                    self.app.call_from_thread(self._progress, None, None)
                    return
                self.app.call_from_thread(self._measured, got)

    def _headers_read(self, rows: list[TensorDiff], manifest: Manifest | None) -> None:
        self.manifest = manifest
        self.show_rows(rows)

    def _progress(self, done: int | None, total: int | None) -> None:
        self.measuring = None if done is None or total is None else (done, total)
        self.update_status()

    def _measured(self, got: list[TensorDiff]) -> None:
        self.table.update_rows(got)
        self.update_context()
        self.update_status()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # (TableScreen's handler runs too and shows the message)
        if event.state == WorkerState.ERROR:
            self.error = describe_error(event.worker.error)

    def update_context(self) -> None:
        line = Text()
        line.append(printable(self.old_spec), style="bold magenta")
        line.append("  →  ")
        line.append(printable(self.new_spec), style="bold")
        rows = self.table.all_rows.values()
        if rows:
            changed = sum(r.status not in ("identical", "pending") for r in rows)
            line.append(f"  ·  {len(self.table.all_rows)} tensors, {changed} changed")
            drifted = sum(r.drift for r in rows)
            stale = sum(r.stale for r in rows)
            if drifted:
                line.append(f" · ▲ {drifted} frozen drifted", style="bold red")
            if stale:
                line.append(f" · • {stale} stale", style="yellow")
            if self.manifest is None:
                line.append("  (no manifest: roles unknown; pass --manifest)", style="dim")
        self.query_one("#context").update(line)

    def open_detail(self, row: TensorDiff) -> None:
        from .detail_screen import DetailScreen
        self.app.push_screen(DetailScreen(row))
