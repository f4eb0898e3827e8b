"""Helpers for the TUI tests: a small real store with planted drift, and a fixed clock.

The store is written through the real ``Store`` API from deterministic numpy
arrays, so hashes (and therefore the SVG snapshots) are the same on every run;
only snapshot ids and timestamps vary, and the TUI shows neither directly
(times are relative to the injected clock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ckptdiff.checkpoint import Checkpoint
from ckptdiff.manifest import Manifest
from ckptdiff.store import Store

N_SNAPSHOTS = 6
DRIFT_FROM = 3          # backbone.0.weight starts drifting at this snapshot
MANIFEST = Manifest.from_dict({
    "trainable": ["head.*", "lora.*"],
    "frozen": ["backbone.*", "old.*"],
    "buffers": ["bn.*"],
}, source="test")


@dataclass
class History:
    path: str
    arrays: list[dict[str, np.ndarray]]   # what each snapshot holds, for expected numbers
    steps: list[int]

    def clock(self) -> Callable[[], float]:
        """'Now' two hours after the last snapshot, so every time renders as '2h ago'."""
        last = max(s.created_at for s in Store.open(self.path).list())
        return lambda: last + 7200


def history_arrays() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    w0 = rng.standard_normal((16, 8)).astype(np.float32)
    head0 = rng.standard_normal((4, 16)).astype(np.float32)
    fixed = {
        "backbone.0.bias": rng.standard_normal(16).astype(np.float32),
        "backbone.1.weight": rng.standard_normal((16, 16)).astype(np.float32),
        "head.bias": np.zeros(4, np.float32),
    }
    out = []
    for s in range(N_SNAPSHOTS):
        a = dict(fixed)
        # frozen, but shrinks by AdamW-style weight decay from DRIFT_FROM on
        decay = np.float32(1 - 1e-4) ** max(0, s - DRIFT_FROM + 1)
        a["backbone.0.weight"] = (w0 * decay).astype(np.float32)
        a["head.weight"] = (head0 + np.float32(0.05) * s).astype(np.float32)
        a["bn.running_mean"] = np.full(16, 0.1 * s, np.float32)
        a["bn.num_batches_tracked"] = np.array(10 * s, np.int64)
        if s >= 2:
            a["lora.A"] = np.full((2, 16), 0.01 * s, np.float32)   # added at snapshot 2
        if s < 4:
            a["old.proj"] = np.ones((4, 4), np.float32)            # removed at snapshot 4
        out.append(a)
    return out


def write_history(path: str) -> History:
    arrays = history_arrays()
    steps = [100 * s for s in range(N_SNAPSHOTS)]
    with Store.open(path, create=True) as store:
        for s, a in enumerate(arrays):
            store.snapshot(Checkpoint.from_arrays(a).tensors, step=steps[s],
                           tag={0: "base", DRIFT_FROM: "lr-restart", N_SNAPSHOTS - 1: "final"}.get(s),
                           message=f"epoch {s}", metrics={"loss": round(2.0 / (s + 1), 4), "acc": 0.5 + 0.05 * s},
                           manifest=MANIFEST if s == 0 else None)
    return History(path, arrays, steps)


def max_abs64(old: np.ndarray, new: np.ndarray) -> float:
    return float(np.max(np.abs(new.astype(np.float64) - old.astype(np.float64))))


def rel_l264(old: np.ndarray, new: np.ndarray) -> float:
    o = old.astype(np.float64)
    return float(np.linalg.norm(new.astype(np.float64) - o) / np.linalg.norm(o))


async def settle(pilot) -> None:  # type: ignore[no-untyped-def]
    """Let every worker finish and the screen catch up with their results."""
    from textual.worker import WorkerCancelled, WorkerFailed

    for _ in range(3):
        await pilot.pause()
        for worker in list(pilot.app.workers):
            try:
                await worker.wait()
            except (WorkerCancelled, WorkerFailed):
                pass  # superseded work is cancelled by design; failures are shown in the app
    await pilot.pause()


def run_async(fn):  # type: ignore[no-untyped-def]
    """Run an ``async def`` test in a fresh event loop (no pytest-asyncio plugin needed)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
