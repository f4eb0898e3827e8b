"""Helpers for the hostile-input tests: run the CLI as a child and measure it, build .pt files by hand.

Imported as ``hostile_helpers`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass


@dataclass
class Run:
    """One CLI run: exit code, output, and the child's own peak resident memory."""

    rc: int
    stdout: str
    stderr: str
    peak_mb: float

    def refused(self) -> str:
        """Assert the error contract (exit 2, exactly one stderr line, no traceback) and return that line."""
        assert self.rc == 2, (self.rc, self.stderr[-500:])
        lines = self.stderr.splitlines()
        assert len(lines) == 1 and self.stderr.endswith("\n"), self.stderr[-500:]
        assert lines[0].startswith("ckptdiff: error: ") and "internal error" not in lines[0], lines[0]
        return lines[0]


#: Runs the CLI and, at exit, writes the process's peak resident memory (VmHWM: this process image only;
#: ru_maxrss would also count the parent's pages the child had before exec).
_CHILD = """import atexit, sys
report = sys.argv.pop(1)
def _peak():
    with open("/proc/self/status") as f, open(report, "w") as out:
        out.write(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
atexit.register(_peak)
from ckptdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
    """``ckptdiff ARGS`` in a child process; ``peak_mb`` is its own peak RSS (NaN if it could not say)."""
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "peak")
        p = subprocess.run([sys.executable, "-c", _CHILD, report, *args], capture_output=True, text=True,
                           env={**os.environ, **(env or {})}, timeout=timeout)
        try:
            with open(report) as f:
                peak = int(f.read()) / 1024
        except (OSError, ValueError):
            peak = float("nan")
    return Run(p.returncode, p.stdout, p.stderr, peak)


def replace_members(src: str, dst: str, replace: dict[str, bytes], extra: list[tuple[str, bytes]] = ()) -> str:
    """Copy a torch zip with some members' bytes replaced (by name suffix) and extra members appended."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(zipfile.ZipInfo(info.filename), data)
        for name, data in extra:
            zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def pt_with_pickle(tmp: str, name: str, pkl: bytes) -> str:
    """A real ``torch.save`` zip whose data.pkl is replaced by ``pkl``."""
    import torch

    base = os.path.join(tmp, f"{name}.base.pt")
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, base)
    return replace_members(base, os.path.join(tmp, f"{name}.pt"), {"data.pkl": pkl})


def legacy_with_pickle(tmp: str, name: str, pkl: bytes) -> str:
    """A legacy-format file whose object pickle (the fourth) is ``pkl``, with an empty storage list."""
    import pickle

    path = os.path.join(tmp, f"{name}.pt")
    with open(path, "wb") as f:
        for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(head, f, protocol=2)
        f.write(pkl)
        pickle.dump([], f, protocol=2)
    return path


#: A pickle that is a dict with one tensor-free entry, for wrapping hostile pieces: PROTO 2, EMPTY_DICT.
PROLOGUE = b"\x80\x02}"
