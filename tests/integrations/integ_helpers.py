"""Reading back what a framework run left in the store, and the exact weights to compare it with."""

from __future__ import annotations

import numpy as np

from ckptdiff.store import Store


def history(store_dir) -> list[tuple[int | None, str | None]]:
    """(step, tag) of every snapshot, oldest first."""
    return [(row.info.step, row.info.tag) for row in snapshot_rows(store_dir)]


def snapshot_rows(store_dir):
    """The store's log rows (snapshot info, drift count vs the first snapshot), oldest first."""
    store = Store.open(str(store_dir))
    try:
        return store.log()
    finally:
        store.close()


def snapshot_array(store_dir, ref: str, name: str) -> np.ndarray:
    """One tensor of a snapshot, as numpy (read through the store's own Checkpoint)."""
    store = Store.open(str(store_dir))
    try:
        return store.open_snapshot(ref)[name].numpy().copy()
    finally:
        store.close()


def as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy().copy()
