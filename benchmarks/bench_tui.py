"""How fast ``ckptdiff tui STORE`` shows its first screen on a big history.

Target: a store of 200 snapshots x 1,000 tensors shows its first screen (the
snapshot list and the latest snapshot's tensor table vs the first) within 1 s
on a 2-core machine.

The TUI gets there by drawing from SQLite metadata only (``Store.list()``
and two snapshots' entry hashes) and putting numbers on changed tensors
later, in workers. The alternative it is measured against, in the same
process, is the eager way: compute everything the screen will eventually
show (the store's per-snapshot log and the engine's full diff of latest vs
first) before drawing anything.

Measured, each as the median of ``--repeat`` runs with Textual's headless
``App.run_test()``:

* import: ``from ckptdiff.tui.app import CkptdiffApp`` in this fresh process
  (textual, rich and the store, once, cold);
* first screen: from creating the app to the list and the table populated;
* keypress: from pressing ``k`` (previous snapshot) to its table shown,
  median of 5 presses made while the first screen's workers still run;
* complete: until every worker is done (all max |Δ| / rel L2 numbers and the
  list's changed/drift columns);
* eager: ``store.log()`` + ``engine.diff(first, latest)`` with no UI at all.

usage::

    .venv/bin/python benchmarks/bench_tui.py             # 200 x 1000 (store cached in benchmarks/data/)
    .venv/bin/python benchmarks/bench_tui.py --quick     # 40 x 300 smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _measure import cpu_model  # noqa: E402

DATA = os.path.join(HERE, "data")
TARGET_S = 1.0
KEYPRESSES = 5


def build_store(path: str, n_snap: int, n_tensors: int, side: int = 32) -> dict[str, int]:
    """A fine-tune history: 10% trainable tensors move every snapshot; 3 frozen ones drift late.

    Written through the real Store API, each snapshot inheriting the unchanged
    tensors from the previous one (as the training hook does), so it takes
    seconds, and cached with a stamp so later runs reuse it.
    """
    from ckptdiff.checkpoint import Checkpoint
    from ckptdiff.manifest import Manifest
    from ckptdiff.store import Store

    params = {"n_snap": n_snap, "n_tensors": n_tensors, "side": side, "version": 1}
    stamp = path + ".stamp.json"
    if os.path.exists(stamp) and os.path.isdir(path):
        with open(stamp) as f:
            if json.load(f) == params:
                return params
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)
    kinds = ("attn.q", "attn.k", "attn.v", "mlp.up", "mlp.down")
    names = [f"layers.{i // len(kinds)}.{kinds[i % len(kinds)]}.weight" for i in range(n_tensors)]
    n_train = max(1, n_tensors // 10)
    trainable = names[-n_train:]
    drifting = names[:3]
    drift_from = int(n_snap * 0.75)
    manifest = Manifest.from_dict({"trainable": trainable})
    current = {n: rng.standard_normal((side, side)).astype(np.float32) for n in names}
    t0 = time.perf_counter()
    with Store.open(path, create=True) as store:
        store.snapshot(Checkpoint.from_arrays(current).tensors, step=0, tag="base", manifest=manifest,
                       metrics={"loss": 3.0})
        for s in range(1, n_snap):
            changed = {}
            for n in trainable:
                current[n] = current[n] + np.float32(1e-3)
                changed[n] = current[n]
            if s >= drift_from:
                for n in drifting:
                    current[n] = current[n] * np.float32(1 - 1e-4)
                    changed[n] = current[n]
            store.snapshot(Checkpoint.from_arrays(changed).tensors, step=s * 100, inherit_from="latest",
                           metrics={"loss": round(3.0 / (1 + 0.05 * s), 5), "lr": 1e-4})
    print(f"built {path}: {n_snap} snapshots x {n_tensors} tensors in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    with open(stamp, "w") as f:
        json.dump(params, f)
    return params


async def one_run(app_cls: type, path: str, n_snap: int, n_tensors: int) -> dict[str, float]:
    t0 = time.perf_counter()
    app = app_cls(store=path)
    async with app.run_test(size=(160, 50)) as pilot:
        screen = app.screen
        while getattr(screen, "loaded_at", None) is None:
            await asyncio.sleep(0.002)
            screen = app.screen
        first = screen.loaded_at - t0
        assert screen.query_one("#history").row_count == n_snap, "history list incomplete"
        assert len(screen.table.all_rows) == n_tensors, "tensor table incomplete"
        drifted = sum(r.drift for r in screen.table.all_rows.values())
        # keypresses while the first screen's workers still run: k steps to the
        # previous snapshot; time until its tensor table is on screen
        keys = []
        for i in range(KEYPRESSES):
            t1 = time.perf_counter()
            await pilot.press("k")
            while screen.shown_pair != (n_snap - 2 - i, 0):
                await asyncio.sleep(0.001)
            keys.append(screen.shown_at - t1)
        key = statistics.median(keys)
        await app.workers.wait_for_complete()
        await pilot.pause()
        complete = time.perf_counter() - t0
        measured = sum(r.max_abs_delta is not None for r in screen.table.all_rows.values())
    return {"first_screen_s": first, "keypress_s": key, "complete_s": complete, "drifted": drifted,
            "measured_rows": measured}


def eager(path: str) -> float:
    """Everything the first screen would show, computed before drawing (no UI)."""
    from ckptdiff import diff
    from ckptdiff.store import Store

    t0 = time.perf_counter()
    with Store.open(path) as store:
        store.log()
        with store.open_snapshot("first") as a, store.open_snapshot("latest") as b:
            diff(a, b)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 snapshots x 300 tensors")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    n_snap, n_tensors = (40, 300) if args.quick else (200, 1000)
    path = os.path.join(DATA, f"tui_store_{n_snap}x{n_tensors}")
    os.makedirs(DATA, exist_ok=True)
    build_store(path, n_snap, n_tensors)

    t0 = time.perf_counter()
    from ckptdiff.tui.app import CkptdiffApp
    import_s = time.perf_counter() - t0

    runs = [asyncio.run(one_run(CkptdiffApp, path, n_snap, n_tensors)) for _ in range(args.repeat)]
    eager_runs = [eager(path) for _ in range(args.repeat)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    first, eager_s = med("first_screen_s"), statistics.median(eager_runs)
    result = {
        "store": f"{n_snap} snapshots x {n_tensors} tensors",
        "machine": f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "import_s": import_s,
        "first_screen_s": first,
        "import_plus_first_screen_s": import_s + first,
        "keypress_s": med("keypress_s"),
        "complete_s": med("complete_s"),
        "eager_s": eager_s,
        "eager_over_first_screen": eager_s / first,
        "drifted_on_first_screen": runs[0]["drifted"],
        "rows_measured": runs[0]["measured_rows"],
        "repeat": args.repeat,
    }
    print(f"store: {result['store']}   ({result['machine']})")
    print(f"  import ckptdiff.tui.app (cold)          {import_s * 1000:7.0f} ms")
    print(f"  first screen (list + table, hashes)     {first * 1000:7.0f} ms   median of {args.repeat}")
    print(f"  import + first screen                   {(import_s + first) * 1000:7.0f} ms   target < "
          f"{TARGET_S * 1000:.0f} ms: {'PASS' if import_s + first < TARGET_S else 'FAIL'}")
    print(f"  keypress k -> previous snapshot's table {result['keypress_s'] * 1000:7.0f} ms")
    print(f"  everything measured (all workers done)  {result['complete_s'] * 1000:7.0f} ms")
    print(f"  eager: store.log() + engine diff, no UI {eager_s * 1000:7.0f} ms   "
          f"= {result['eager_over_first_screen']:.1f}x the first screen")
    print(f"  drifted frozen tensors on first screen: {result['drifted_on_first_screen']}; "
          f"rows measured by the engine: {result['rows_measured']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if import_s + first < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
