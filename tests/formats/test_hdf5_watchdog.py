"""A C library call that never returns ends the CLI with one line and exit 2.

A corrupted HDF5 file can make the HDF5 library loop forever while holding
the GIL; ckptdiff.watchdog keeps a deadline from a C thread. These tests
stand in for the hanging library with calls that block far longer than the
deadline (one of them holding the GIL the whole time).
"""

from __future__ import annotations

import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ckptdiff import watchdog

pytestmark = pytest.mark.skipif(not watchdog.available(), reason="the C module ckptdiff._watchdog was not built")


def run(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    import os

    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    return p, time.perf_counter() - t


def h5(tmp_path, name="a.h5"):  # noqa: ANN001, ANN201
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        f["w"] = np.arange(4, dtype=np.float32)
    return str(path)


def test_a_hanging_hdf5_read_ends_the_cli_with_one_line_and_exit_2(tmp_path):
    a, b = h5(tmp_path), h5(tmp_path, "b.h5")
    code = ("import sys, time\n"
            "import ckptdiff.formats.hdf5_format as h\n"
            "h._build = lambda *a: time.sleep(30)  # HDF5 'looping forever' inside the metadata walk\n"
            "from ckptdiff.cli import main\n"
            "sys.exit(main(['diff', sys.argv[1], sys.argv[2]]))")
    p, took = run(code, a, b, env={"CKPTDIFF_HDF5_TIMEOUT": "0.5"})
    assert p.returncode == 2 and took < 20
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"ckptdiff: error: {a}: the HDF5 library did not "
                                                               "finish reading this file's metadata in 0.5 s")
    assert "CKPTDIFF_HDF5_TIMEOUT" in p.stderr and p.stdout == ""


def test_the_deadline_holds_while_a_call_keeps_the_gil():
    code = ("import sys\nfrom ckptdiff import watchdog\n"
            "with watchdog.enabled(), watchdog.deadline(0.3, 'x.h5: stuck'):\n"
            "    sum(i * i for i in range(10**10))  # Python holding the GIL for minutes\n"
            "print('not reached')")
    p, took = run(code)
    assert (p.returncode, p.stdout, p.stderr) == (2, "", "ckptdiff: error: x.h5: stuck\n") and took < 20


def test_a_block_that_finishes_in_time_disarms_it_and_the_library_never_exits():
    code = ("import time\nfrom ckptdiff import watchdog\n"
            "with watchdog.enabled():\n"
            "    for _ in range(3):\n"
            "        with watchdog.deadline(1.0, 'never'):\n"
            "            time.sleep(0.05)\n"
            "    time.sleep(1.3)  # past every deadline: all were disarmed\n"
            "with watchdog.deadline(0.1, 'library use: not enabled'):\n"
            "    time.sleep(0.4)\n"
            "print('ok')")
    p, _ = run(code)
    assert (p.returncode, p.stdout.strip(), p.stderr) == (0, "ok", "")


def test_a_normal_hdf5_diff_under_the_cli_is_unaffected(tmp_path):
    from ckptdiff.cli import main

    a, b = h5(tmp_path), h5(tmp_path, "b.h5")
    assert main(["diff", a, b, "-q"]) == 0
    assert not watchdog._enabled  # the CLI's block ended; library calls are unguarded again


def test_bad_timeout_settings_fall_back_to_the_default(monkeypatch):
    for raw in ("", "abc", "-1", "0", "nan", "1e99"):
        monkeypatch.setenv("CKPTDIFF_HDF5_TIMEOUT", raw)
        assert watchdog.hdf5_timeout() == watchdog.HDF5_TIMEOUT_DEFAULT
    monkeypatch.setenv("CKPTDIFF_HDF5_TIMEOUT", "2.5")
    assert watchdog.hdf5_timeout() == 2.5
