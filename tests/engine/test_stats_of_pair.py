"""DeltaStats.of_pair (one measuring call) gives exactly what the streaming add_changed gives."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ckptdiff import dtypes
from ckptdiff.stats import DeltaStats

_FIELDS = ("changed_elements", "out_of_tolerance", "finite_both", "max_abs_delta", "sum_abs_delta", "nan_new",
           "inf_new", "sum_old_delta", "round_mask", "changed_rows", "first_rows", "_last_row", "mean_abs_delta",
           "rel_l2")


def _pairs():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 7)).astype(np.float32)
    yield "float32", (7,), a, a + np.float32(1e-3)
    b = a.copy()
    b[3, 2] = np.nan
    b[5, 1] = np.inf
    yield "float32", (7,), a, b
    c = a.copy()
    c[0, 0] = -c[0, 0]
    yield "float32", (7,), a, c
    z = np.zeros_like(a)
    yield "float32", (7,), z, z + np.float32(2)
    yield "bfloat16", (7,), a.astype(ml_dtypes.bfloat16), (a * 2).astype(ml_dtypes.bfloat16)
    yield "float16", (), a.ravel()[:9].astype(np.float16), (a.ravel()[:9] + 1).astype(np.float16)
    yield "int64", (7,), np.arange(14, dtype=np.int64), np.arange(14, dtype=np.int64)[::-1].copy()
    yield "float64", (7,), a.astype(np.float64) * 1e200, a.astype(np.float64) * 3e200
    yield "float32", (7,), a.astype(np.float32), a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 1e-2)])
def test_of_pair_equals_the_streaming_sums(tol):
    for name, rest, old, new in _pairs():
        info = dtypes.DTYPES[name]
        row = int(np.prod(rest)) if rest else 0
        ca, cb = memoryview(old.tobytes()), memoryview(new.tobytes())
        streamed = DeltaStats(info, *tol, row)
        streamed.add_changed(ca, cb)
        once = DeltaStats.of_pair(info, ca, cb, *tol, row)
        for f in _FIELDS:
            x, y = getattr(once, f), getattr(streamed, f)
            assert (x == y) or (x != x and y != y), (name, f, x, y)
        assert (once.delta_norm.scale, once.delta_norm.ssq) == (streamed.delta_norm.scale, streamed.delta_norm.ssq)
        assert (once.old_norm.scale, once.old_norm.ssq) == (streamed.old_norm.scale, streamed.old_norm.ssq)
