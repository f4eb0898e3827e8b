"""The merge tolerance: what a correct merge may round away passes, anything more is off.

Plain numpy, no torch: merges are computed the ways a merger may compute
them (float32 matmul in any order, float64 then rounded, bf16 through
float32) and must verify; errors a few times the tolerance must not.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ckptdiff.checkpoint import Checkpoint
from ckptdiff.lora.check import check_delta, precision

BF16 = np.dtype(ml_dtypes.bfloat16)


def factors(rows=24, cols=40, r=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    b = (rng.standard_normal((rows, r)) * 0.3).astype(np.float32)
    a = rng.standard_normal((r, cols)).astype(np.float32)
    return w, b, a


def check(w, merged, b, a, scaling, rank=None):
    ck = Checkpoint.from_arrays({"w": w, "m": merged})
    return check_delta(ck["w"], ck["m"], b.astype(np.float64), a.astype(np.float64), rank=rank or a.shape[0],
                       scaling=scaling, kind="lora", adapter_key="k")


@pytest.mark.parametrize("how", ["float32 matmul", "scaled B first", "float64 rounded", "per-term float32 sum"])
def test_correct_float32_merges_verify(how):
    w, b, a = factors()
    s = np.float32(2.0 / 8)
    if how == "float32 matmul":
        merged = w + (b @ a) * s
    elif how == "scaled B first":
        merged = w + (b * s) @ a
    elif how == "float64 rounded":
        merged = (w.astype(np.float64) + s * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    else:  # the worst summation order: one rounding per term, largest first
        acc = np.zeros_like(w)
        for k in np.argsort(-np.abs(b).sum(0)):
            acc = acc + np.outer(b[:, k], a[k])
        merged = w + acc * s
    res = check(w, merged.astype(np.float32), b, a, float(s))
    assert res.verdict == "merge-exact" and res.elements_off == 0 and res.tolerance_ratio <= 1


def test_bf16_merge_through_float32_verifies_and_an_unmerged_one_does_not():
    w32, b, a = factors(seed=1)
    w = w32.astype(BF16)
    merged = (w.astype(np.float32) + (b @ a) * np.float32(0.5)).astype(BF16)
    assert check(w, merged, b, a, 0.5).verdict == "merge-exact"
    assert check(w, w, b, a, 0.5).verdict == "merge-off"


def test_an_error_a_few_tolerances_wide_is_off_and_counted():
    w, b, a = factors(seed=2)
    merged = (w.astype(np.float64) + 0.25 * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    u, _ = precision("float32")
    exact = w.astype(np.float64) + 0.25 * (b.astype(np.float64) @ a.astype(np.float64))
    bump = 40 * u * (abs(exact[5, 7]) + (8 + 2) * 0.25 * (np.abs(b[5]).astype(np.float64) @ np.abs(a[:, 7])))
    merged[5, 7] = np.float32(exact[5, 7] + bump)
    res = check(w, merged, b, a, 0.25)
    assert res.verdict == "merge-off" and res.elements_off == 1
    assert res.max_error == pytest.approx(bump, rel=0.05)
    assert 5 < res.tolerance_ratio < 40


def test_nan_in_merged_is_off_but_matching_infinities_are_exact():
    w, b, a = factors(seed=3)
    w[0, 0] = np.inf
    merged = (w + (b @ a) * np.float32(0.5)).astype(np.float32)
    assert check(w, merged, b, a, 0.5).verdict == "merge-exact"
    merged[1, 1] = np.nan
    res = check(w, merged, b, a, 0.5)
    assert res.verdict == "merge-off" and res.elements_off == 1 and np.isnan(res.max_error)


def test_empty_tensor_is_trivially_exact():
    w = np.zeros((0, 4), np.float32)
    res = check(w, w, np.zeros((0, 2), np.float32), np.zeros((2, 4), np.float32), 1.0)
    assert res.verdict == "merge-exact"
