"""Progress: the store reports bytes through a callback and draws nothing; the one bar draws only on a terminal."""

from __future__ import annotations

import io

import numpy as np

from ckptdiff import Checkpoint, progress
from ckptdiff.store import Store


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_store_reports_through_the_callback_and_draws_nothing(tmp_path, monkeypatch):
    fake = _FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    ck = Checkpoint.from_arrays({"a": np.zeros(1000, np.float32), "b": np.ones(24, np.int64)})
    calls: list[tuple[int, int]] = []
    with Store.init(tmp_path / "s") as st:
        st.snapshot(ck, progress=lambda d, t: calls.append((d, t)))
        assert calls[0] == (0, 4192) and calls[-1] == (4192, 4192)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
        calls.clear()
        st.verify(progress=lambda d, t: calls.append((d, t)))
        assert calls[-1] == (4192, 4192)
        calls.clear()
        st.export("latest", tmp_path / "x.safetensors", progress=lambda d, t: calls.append((d, t)))
        assert calls[-1] == (4192, 4192)
    assert fake.getvalue() == ""


def test_bar_silent_when_not_a_tty_disabled_or_small(monkeypatch):
    with progress.byte_bar("snapshot") as cb:  # pytest's stderr is not a terminal
        assert cb is None
    fake = _FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    with progress.byte_bar("snapshot", enabled=False) as cb:
        assert cb is None
    with progress.byte_bar("snapshot") as cb:
        assert cb is not None
        cb(10, 10)
    assert fake.getvalue() == ""


def test_bar_drawn_on_a_terminal(monkeypatch):
    fake = _FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    with progress.byte_bar("verify") as cb:
        assert cb is not None
        cb(progress.MIN_BYTES, progress.MIN_BYTES * 2)
        cb(progress.MIN_BYTES * 2, progress.MIN_BYTES * 2)
    assert "verify" in fake.getvalue()
