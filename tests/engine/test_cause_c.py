"""The C classifier (``_cstats.measure_row``) against the Python one, value for value.

A changed tensor of a run is measured and classified in one C call
(:func:`ckptdiff.stats.measured_row`); everywhere else the numbers come from
``DeltaStats`` and :func:`ckptdiff.cause.classify`. Both must give the same
row: equal floats bit for bit, the same cause, the same evidence with its
keys in the same order. The pairs below are built to reach every rule and
its edges (zero, tiny and huge norms, NaN/Inf, exact roundings, a few
changed rows), plus seeded random ones. Each test holds the two
implementations against each other on the same bytes, so no expected value
depends on the CPU that made the inputs.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import ckptdiff
from ckptdiff import compare, stats
from ckptdiff.cause import CAUSES, RUNNING_STAT_NAMES, Sums, classify, sums_of
from ckptdiff.dtypes import DTYPES

pytestmark = pytest.mark.skipif(not stats._C_ROWS, reason="the C statistics module was not built")


def _python_row(dtype: str, a: np.ndarray, b: np.ndarray, name: str, atol: float = 0.0, rtol: float = 0.0) -> tuple:
    info = DTYPES[dtype]
    st = stats.DeltaStats.of_pair(info, memoryview(a.tobytes()), memoryview(b.tobytes()), atol, rtol,
                                  compare.row_len(a.shape))
    cause, detail = classify(sums_of(name, a.shape, st))
    return (st.changed_elements, st.out_of_tolerance, st.nan_new, st.inf_new,
            st.max_abs_delta if st.finite_both else None, st.mean_abs_delta, st.rel_l2, cause, detail)


def _c_row(dtype: str, a: np.ndarray, b: np.ndarray, name: str, atol: float = 0.0, rtol: float = 0.0) -> tuple | None:
    return compare.measured_row(DTYPES[dtype], memoryview(a.tobytes()), memoryview(b.tobytes()), atol, rtol,
                                a.shape, a.size, name)


def _key(x: object) -> object:
    """A value that compares equal only when the two are the same: floats by their bits, dicts with their order."""
    if isinstance(x, float):
        return ("nan",) if math.isnan(x) else ("float", struct.pack("<d", x))
    if isinstance(x, dict):
        return ("dict", [(k, _key(v)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_key(v) for v in x])
    return (type(x).__name__, x)


def _same(dtype: str, a: np.ndarray, b: np.ndarray, name: str = "layer.weight", **tol: float) -> str:
    want = _python_row(dtype, a, b, name, **tol)
    got = _c_row(dtype, a, b, name, **tol)
    assert got is not None
    assert _key(got) == _key(want), f"\nC:      {got}\nPython: {want}"
    return got[7]


def _np_dtype(dtype: str) -> np.dtype:
    return {"float64": np.float64, "float32": np.float32, "float16": np.float16}[dtype]


RNG = np.random.default_rng(20261203)


def _cases(dtype: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    t = _np_dtype(dtype)
    w = RNG.standard_normal((32, 24)).astype(t)
    out = []
    for c in (1e-4, 0.01, 0.3, 0.49, 0.5, 0.9):  # decoupled decay, up to and past DECAY_MAX_C
        out.append((f"decay {c}", w, (w - t(c) * w).astype(t)))
    out.append(("rescaled", w, (w * t(1.5)).astype(t)))
    step = (np.sign(RNG.standard_normal(w.shape)) * 1e-3).astype(t)
    out.append(("optimizer step", w, (w + step).astype(t)))
    out.append(("step with decay", w, (w + step - t(0.02) * w).astype(t)))
    out.append(("dense", w, (w + RNG.standard_normal(w.shape).astype(t) * t(0.01)).astype(t)))
    rows = w.copy()
    rows[[3, 17, 30]] += t(0.5)
    out.append(("sparse rows", w, rows))
    many = w.copy()
    many[::3] += t(0.5)
    out.append(("too many rows", w, many))
    out.append(("reinitialized", w, RNG.standard_normal(w.shape).astype(t)))
    out.append(("zeroed", w, np.zeros_like(w)))
    out.append(("from zero", np.zeros_like(w), w))
    one = w.copy()
    one[5, 5] += t(1)
    out.append(("one element", w, one))
    nan = w.copy()
    nan[1, 2], nan[3, 4] = np.nan, np.inf
    out.append(("nan and inf", w, nan))
    old_nan = w.copy()
    old_nan[0, 0] = np.nan
    out.append(("nan on both sides", old_nan, (old_nan * t(0.999)).astype(t)))
    out.append(("all nan", w, np.full_like(w, np.nan)))
    out.append(("tiny", w[:1, :3].copy(), (w[:1, :3] * t(0.99)).astype(t)))
    out.append(("vector", w[0].copy(), (w[0] * t(0.999)).astype(t)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_every_rule_gives_the_python_row(dtype):
    seen = {_same(dtype, a, b) for _, a, b in _cases(dtype)}
    assert {"weight_decay", "rescaled", "sparse_rows", "reinitialized", "nan_inf", "dense_update"} <= seen


def test_the_rows_agree_under_a_tolerance():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    v = (w + RNG.standard_normal(w.shape).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
    for atol, rtol in ((1e-3, 0.0), (0.0, 1e-2), (1e-9, 1e-9)):
        _same("float32", w, v, atol=atol, rtol=rtol)


@pytest.mark.parametrize("narrow", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_a_precision_roundtrip_gives_the_python_row(narrow):
    import ml_dtypes

    w = (RNG.standard_normal((16, 16)) * 0.1).astype(np.float32)
    back = w.astype(getattr(ml_dtypes, narrow) if narrow != "float16" else np.float16).astype(np.float32)
    assert _same("float32", w, back) == "precision_roundtrip"


def test_float64_norms_at_the_ends_of_the_range():
    for scale in (1e-300, 1e-170, 1e-160, 1e150, 1e300):
        for _, a, b in _cases("float64"):
            _same("float64", a * scale, b * scale)


def test_a_fit_whose_squared_norm_underflows_divides_by_the_norm_twice():
    # ||old|| = 1e-163: ||old||^2 is 0 in float64, while Σ old·Δ (1.5e-323) and the cosine are not
    s = Sums(name="w", is_float=True, numel=100, changed=100, sum_abs_delta=1e-159, delta_norm=1e-160,
             old_norm=1e-163, sum_old_delta=1.5e-323)
    cause, detail = classify(s)
    assert cause == "rescaled" and detail["c"] == pytest.approx(1.5e-323 / 1e-163 / 1e-163, rel=1e-3)


@pytest.mark.parametrize("dtype", ["int64", "int32", "int8", "uint8", "bool"])
def test_integers_and_bools_give_the_python_row(dtype):
    a = RNG.integers(0, 2 if dtype == "bool" else 100, (12, 10)).astype(dtype)
    b = a.copy()
    b[2] = ~b[2] if dtype == "bool" else b[2] + 1
    assert _same(dtype, a, b) == "sparse_rows"
    b = a.copy()
    b[:, 3] = ~b[:, 3] if dtype == "bool" else b[:, 3] + 1
    assert _same(dtype, a, b) == "dense_update"


@pytest.mark.parametrize("name", [*(f"bn.{n}" for n in RUNNING_STAT_NAMES), "model/bn/moving_mean:0",
                                  "bn.running_mean:0", "running_mean", "a.b/running_var", "x.running_mean.y",
                                  "running_mean.weight", "a:b.running_var", "ünï.running_var", "bn.running_means",
                                  "a/b.c", ""])
def test_running_statistics_are_named_as_in_python(name):
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    _same("float32", w, (w * np.float32(0.9)).astype(np.float32), name=name)


def test_a_name_that_is_not_utf8_is_left_to_python():
    w = np.ones(16, np.float32)
    assert _c_row("float32", w, w * 2, "bad\ud800.running_mean") is None


def test_random_pairs_give_the_python_row():
    for i in range(300):
        dtype = ("float32", "float64", "float16")[i % 3]
        t = _np_dtype(dtype)
        shape = ((int(RNG.integers(1, 9)),), (int(RNG.integers(1, 12)), int(RNG.integers(1, 12))))[i % 2]
        a = (RNG.standard_normal(shape) * 10.0 ** RNG.integers(-3, 3)).astype(t)
        kind = i % 5
        if kind == 0:
            b = (a * t(1 - RNG.uniform(-0.6, 0.6))).astype(t)
        elif kind == 1:
            b = (a + (np.sign(RNG.standard_normal(shape)) * RNG.uniform(0, 1e-2)).astype(t)).astype(t)
        elif kind == 2:
            b = a.copy()
            b.flat[RNG.integers(0, a.size)] += t(1)
        elif kind == 3:
            b = RNG.standard_normal(shape).astype(t)
        else:
            b = (a + RNG.standard_normal(shape).astype(t) * t(RNG.uniform(0, 1))).astype(t)
        if a.tobytes() != b.tobytes():
            assert _same(dtype, a, b) in CAUSES


def test_a_diff_of_files_takes_the_c_rows_and_matches_the_python_path(tmp_path, monkeypatch):
    """Small tensors in one file go through the runs (the C rows); the same pairs from arrays do not."""
    old = {f"l{i}.weight": RNG.standard_normal((8, 8)).astype(np.float32) for i in range(40)}
    old["bn.running_mean"] = RNG.standard_normal(8).astype(np.float32)
    new = {}
    for i, (k, v) in enumerate(old.items()):
        new[k] = (v, (v * np.float32(0.99)).astype(np.float32), v + np.float32(1e-3),
                  RNG.standard_normal(v.shape).astype(np.float32))[i % 4]
    save_file(old, str(tmp_path / "a.safetensors"))
    save_file(new, str(tmp_path / "b.safetensors"))
    calls = []
    real = stats.measured_row
    monkeypatch.setattr(stats, "measured_row", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(ckptdiff.compare, "_measured_row", None)
    from_files = ckptdiff.diff(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    from_arrays = ckptdiff.diff(ckptdiff.Checkpoint.from_arrays(old), ckptdiff.Checkpoint.from_arrays(new))
    assert len(calls) == from_files.summary()["changed"] == 30
    rows = {t.name: _key(t.to_dict()) for t in from_files.tensors}
    assert rows == {t.name: _key(t.to_dict()) for t in from_arrays.tensors}
