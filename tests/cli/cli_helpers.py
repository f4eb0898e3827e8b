"""What the CLI tests share: odd tensor names and a way to run the real ``main``."""

from __future__ import annotations

import os

from ckptdiff.cli import main

#: Names a hostile (or just odd) checkpoint may hold.
HOSTILE = ["evil\nname", "cr\rname", "esc\x1b[2Jclear", "rtl\u202eoverride", "tab\tname", "pct%0A,x:y",
           "pipe|back`tick", "ünïcødé.权重", "emoji🔥.w", "a" * 300]
ESC = "\x1b"


def cli(capsys, *args: object) -> tuple[int, str, str]:
    rc = main([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptdiff: error: ") and "Traceback" not in err
    return lines[0]

