"""Fixtures for the TUI tests (the data itself is built in tui_helpers.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("textual")

from tui_helpers import MANIFEST, History, history_arrays, write_history  # noqa: E402


@pytest.fixture
def history(tmp_path, monkeypatch) -> History:
    """A 6-snapshot store at ./store (relative, so screenshots show no tmp path)."""
    monkeypatch.chdir(tmp_path)
    return write_history("store")


@pytest.fixture
def pair_files(tmp_path, monkeypatch) -> tuple[str, str, str]:
    """Two .npz checkpoints (snapshot 0 and the last) plus a manifest JSON, relative paths."""
    monkeypatch.chdir(tmp_path)
    arrays = history_arrays()
    np.savez("old.npz", **arrays[0])
    np.savez("new.npz", **arrays[-1])
    with open("manifest.json", "w") as f:
        json.dump(MANIFEST.to_dict(), f)
    assert os.path.exists("new.npz")
    return "old.npz", "new.npz", "manifest.json"


