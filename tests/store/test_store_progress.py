"""Progress bars: drawn on a terminal for big work, silent otherwise."""

from __future__ import annotations

import io

from ckptdiff.store import progress


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_tty_or_small(monkeypatch, capsys):
    with progress.byte_progress("snapshot", 1 << 40, True) as advance:
        advance(1 << 30)
    with progress.byte_progress("snapshot", 10, True) as advance:
        advance(10)
    assert capsys.readouterr().err == ""


def test_drawn_on_a_terminal(monkeypatch):
    fake = _FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    with progress.byte_progress("verify", progress.MIN_BYTES * 2, True) as advance:
        advance(progress.MIN_BYTES)
        advance(progress.MIN_BYTES)
    assert "verify" in fake.getvalue()
    fake2 = _FakeTTY()
    monkeypatch.setattr("sys.stderr", fake2)
    with progress.byte_progress("verify", progress.MIN_BYTES * 2, False) as advance:
        advance(1)
    assert fake2.getvalue() == ""
