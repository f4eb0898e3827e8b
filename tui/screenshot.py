"""Render the TUI headless to an SVG, for the README and for eyeballing changes.

    python -m ckptdiff.tui.screenshot sample_ckpts/history docs/screenshot.svg

Runs the real app with Textual's test driver, waits until every worker has
filled in its numbers, optionally presses some keys, and saves the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from textual.pilot import Pilot
from textual.worker import WorkerCancelled, WorkerFailed

from .app import CkptdiffApp


async def settle(app: CkptdiffApp, pilot: Pilot) -> None:
    """Wait for every worker (and the ones they start) to finish."""
    for _ in range(3):
        await pilot.pause()
        for worker in list(app.workers):
            try:
                await worker.wait()
            except (WorkerCancelled, WorkerFailed):
                pass  # shown in the app's status line


async def render(app: CkptdiffApp, out: str, size: tuple[int, int], keys: list[str]) -> None:
    async with app.run_test(size=size) as pilot:
        await settle(app, pilot)
        if keys:
            await pilot.press(*keys)
            await settle(app, pilot)
        await pilot.pause()
        with open(out, "w", encoding="utf-8") as f:
            f.write(app.export_screenshot(title="ckptdiff tui"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="a store, or OLD NEW")
    ap.add_argument("out", help="SVG file to write")
    ap.add_argument("--size", default="120x34", help="terminal WIDTHxHEIGHT (default %(default)s)")
    ap.add_argument("--keys", default="", help="comma-separated keys to press first, e.g. 'tab,enter'")
    args = ap.parse_args(argv)
    w, _, h = args.size.partition("x")
    if len(args.paths) == 1:
        app = CkptdiffApp(store=args.paths[0])
    elif len(args.paths) == 2:
        app = CkptdiffApp(old=args.paths[0], new=args.paths[1])
    else:
        ap.error("give a store, or OLD NEW")
    asyncio.run(render(app, args.out, (int(w), int(h)), [k for k in args.keys.split(",") if k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
