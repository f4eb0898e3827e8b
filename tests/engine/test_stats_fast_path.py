"""Narrow-float statistics: the finite fast path and BLAS ``dot`` against the general path.

The statistics skip the finiteness masks until a sum comes out non-finite,
and take BLAS ``dot`` when OpenBLAS is pinned to one thread: the numbers must
equal the general path's and an independent float64 reference.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from ckptdiff import dtypes, stats, stats_numpy
from engine_helpers import write_pair


def reference(a: np.ndarray, b: np.ndarray) -> dict:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both = np.isfinite(a64) & np.isfinite(b64)
    d = np.abs(b64 - a64)[both]
    return {"max": float(d.max()), "mean": float(d.mean()),
            "rel": float(np.sqrt((d * d).sum()) / np.sqrt((a64[both] ** 2).sum())),
            "nan_new": int((np.isnan(b64) & ~np.isnan(a64)).sum())}


def measure(a: np.ndarray, b: np.ndarray, block: int) -> stats.DeltaStats:
    s = stats.DeltaStats(dtypes.from_numpy(a.dtype))
    old = stats_numpy.STATS_BLOCK
    stats_numpy.STATS_BLOCK = block
    try:
        s.add_changed(memoryview(a.view(np.uint8)), memoryview(b.view(np.uint8)))
    finally:
        stats_numpy.STATS_BLOCK = old
    return s


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
@pytest.mark.parametrize("dot", [False, True])
def test_finite_fast_path_and_dot_match_the_reference(monkeypatch, stats_backend, dtype, dot):
    monkeypatch.setattr(stats_numpy, "_DOT_OK", dot)
    rng = np.random.default_rng(11)
    a = (rng.standard_normal(5000) * 0.5).astype(dtype)
    b = (a.astype(np.float32) + rng.standard_normal(5000).astype(np.float32) * 0.01).astype(dtype)
    b[4000:] = a[4000:]  # the last blocks identical: they only add to ||old||
    ref = reference(a, b)
    s = measure(a, b, 1024)
    assert math.isclose(s.max_abs_delta, ref["max"], rel_tol=1e-12)
    assert math.isclose(s.mean_abs_delta, ref["mean"], rel_tol=1e-9)
    assert math.isclose(s.rel_l2, ref["rel"], rel_tol=1e-9)
    assert s.changed_elements == int((a.view(np.uint8 if a.itemsize == 1 else np.uint16 if a.itemsize == 2
                                            else np.uint32) != b.view(np.uint8 if a.itemsize == 1 else np.uint16
                                                                        if a.itemsize == 2 else np.uint32)).sum())


@pytest.mark.parametrize("where", [0, 1500, 4999])
def test_a_nan_in_one_block_falls_back_for_that_block_only(stats_backend, where):
    rng = np.random.default_rng(12)
    a = rng.standard_normal(5000).astype(np.float32)
    b = a + np.float32(0.25)
    b[where] = np.nan
    a[(where + 7) % 5000] = np.inf  # and an Inf in OLD only (b was computed before it)
    ref = reference(a, b)
    s = measure(a, b, 1024)
    assert s.nan_new == ref["nan_new"] == 1
    assert s.finite_both == int((np.isfinite(a) & np.isfinite(b)).sum()) == 4998
    assert math.isclose(s.max_abs_delta, ref["max"], rel_tol=1e-12)
    assert math.isclose(s.mean_abs_delta, ref["mean"], rel_tol=1e-9)
    assert math.isclose(s.rel_l2, ref["rel"], rel_tol=1e-9)


def test_the_cli_pins_openblas_to_one_thread_only_before_numpy_loads(tmp_path):
    probe = ("import os, sys\nfrom ckptdiff.cli import main\nmain(['--version'])\n"
             "print(os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout
    assert out.strip().splitlines()[-1] in ("1", "None")  # --version exits in argparse before the pin
    probe = ("import os, sys\nfrom ckptdiff.cli import main\nmain(['diff', sys.argv[1], sys.argv[1], '-q'])\n"
             "print(os.environ.get('OPENBLAS_NUM_THREADS'))\nimport ckptdiff.stats_numpy as s\nprint(s._DOT_OK)")
    a = {"w": np.ones(3, np.float32)}
    pa, _ = write_pair(tmp_path, a, a)
    out = subprocess.run([sys.executable, "-c", probe, pa], capture_output=True, text=True, env=env).stdout.split()
    assert out == ["1", "True"]
    env["OPENBLAS_NUM_THREADS"] = "2"  # a user's own setting wins, and then einsum is used
    out = subprocess.run([sys.executable, "-c", probe, pa], capture_output=True, text=True, env=env).stdout.split()
    assert out == ["2", "False"]
