"""The C statistics module (ckptdiff._cstats) against numpy and ml_dtypes.

The engine-level property test (tests/engine/test_engine.py) already runs both
implementations against an independent float64 reference; these tests pin
what only the C module has: its own decoding tables, float64 extremes, loads
from unaligned addresses, and its argument checks.
"""

from __future__ import annotations

import json
import math
import os
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdiff import dtypes, stats, stats_numpy, stats_types

try:
    from ckptdiff import _cstats as cstats
except ImportError:  # no C compiler at install time: the numpy fallback is tested elsewhere
    cstats = None

ALL = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
       np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32, np.uint16, np.uint8, np.bool_]


def test_the_c_module_is_built_here():
    """Installs with a C compiler (this test environment has one) build it; without one,
    ckptdiff falls back to numpy, and this says so instead of silently going slower."""
    if os.environ.get("CKPTDIFF_STATS", "").lower() == "numpy":
        pytest.skip("CKPTDIFF_STATS=numpy forces the fallback")
    assert stats.backend() == "c", "ckptdiff._cstats is missing: was the package installed without a C compiler?"
    assert set(cstats.KINDS) == set(dtypes.DTYPES)
    from ckptdiff import watchdog

    assert watchdog.available(), "ckptdiff._watchdog is missing: was the package installed without a C compiler?"


needs_c = pytest.mark.skipif(stats.backend() != "c", reason="the C statistics module is not in use (not built, or CKPTDIFF_STATS=numpy)")


def kind(dt) -> int:
    return cstats.KINDS.index(dtypes.from_numpy(np.dtype(dt)).name)


@needs_c
@pytest.mark.parametrize("dt", [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_every_bit_pattern_decodes_like_numpy(dt):
    """All 65,536 (or 256) codes, NaNs, infinities, subnormals and -0.0 included."""
    size = np.dtype(dt).itemsize
    codes = np.arange(1 << (8 * size), dtype=np.uint16 if size == 2 else np.uint8)
    with np.errstate(invalid="ignore"):
        want = codes.view(dt).astype(np.float64)
    got = np.concatenate([cstats.decode(kind(dt), codes[i:i + 1024].tobytes()) for i in range(0, codes.size, 1024)])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])
    assert np.array_equal(np.signbit(got[ok]), np.signbit(want[ok]))  # -0.0 stays negative


@needs_c
@pytest.mark.parametrize("dt", [np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32, np.uint16, np.uint8,
                                np.float32, np.float64, np.bool_])
def test_integers_bools_and_wide_floats_decode_like_numpy(dt):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=1024 * np.dtype(dt).itemsize, dtype=np.uint8)
    if dt is np.bool_:
        raw[:4] = [0, 1, 2, 255]  # any non-zero byte is True, as numpy reads it
    x = raw.view(dt)
    got = np.array(cstats.decode(kind(dt), raw.tobytes()))
    with np.errstate(invalid="ignore"):
        want = x.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(want)], want[~np.isnan(want)])


def measured(backend: str, a: np.ndarray, b: np.ndarray | None, atol=0.0, rtol=0.0) -> stats.DeltaStats:
    kinds = stats._C_KIND if backend == "c" else {}
    saved = stats._C_KIND
    stats._C_KIND = kinds
    try:
        s = stats.DeltaStats(dtypes.from_numpy(a.dtype), atol, rtol)
    finally:
        stats._C_KIND = saved
    if b is None:
        s.add_identical(memoryview(a.tobytes()))
    else:
        s.add_changed(memoryview(a.tobytes()), memoryview(b.tobytes()))
    return s


FIELDS = ("changed_elements", "out_of_tolerance", "finite_both", "nan_new", "inf_new")


def same_numbers(x: stats.DeltaStats, y: stats.DeltaStats) -> None:
    for f in FIELDS:
        assert getattr(x, f) == getattr(y, f), f
    for f in ("max_abs_delta", "mean_abs_delta", "rel_l2"):
        u, v = getattr(x, f), getattr(y, f)
        assert (u is None) == (v is None), f
        if u is not None:
            assert u == v or math.isclose(u, v, rel_tol=1e-12), (f, u, v)


@needs_c
def test_float64_extremes_are_scaled_not_overflowed():
    """Squares of 1e200 overflow and of 1e-200 underflow; a delta of 2e308 is itself inf."""
    a = np.array([1e200, -3e200, 1e-200, 5e-201, 1.0, 1e308, 0.0] * 300, np.float64)
    b = a.copy()
    b[0::7] = 2e200
    b[2::7] = 3e-200
    b[5::7] = -1e308  # |delta| = 2e308: inf in float64
    c, n = measured("c", a, b), measured("numpy", a, b)
    same_numbers(c, n)
    assert c.max_abs_delta == math.inf and c.rel_l2 == math.inf
    # several blocks with an infinite delta norm merge to inf, not NaN (inf/inf)
    with mock.patch.object(stats_numpy, "STATS_BLOCK", 7):
        assert measured("numpy", a, b).rel_l2 == math.inf
    # without the overflowing pair, the norms are finite and exact to rounding
    b[5::7] = a[5::7]
    c, n = measured("c", a, b), measured("numpy", a, b)
    same_numbers(c, n)
    d = np.abs(b - a)
    want = np.linalg.norm(d / 1e200) / np.linalg.norm(a / 1e308) * 1e-108  # ||a|| > 1e308 itself
    assert math.isclose(c.rel_l2, want, rel_tol=1e-12)
    assert math.isclose(c.max_abs_delta, 1e200, rel_tol=1e-15)


@needs_c
@pytest.mark.parametrize("dt", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e5m2])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)])
def test_nan_and_inf_cases_match_numpy(dt, tol):
    """Every way a position can be non-finite: appears, disappears, stays, changes payload."""
    a = np.linspace(-3, 3, 4096).astype(dt)
    b = (a.astype(np.float64) * 1.01).astype(dt)
    a[10], b[10] = 1.0, np.nan           # NaN appears
    a[11], b[11] = np.nan, 1.0           # NaN disappears
    a[12] = b[12] = np.nan               # NaN stays (same bits)
    a[13], b[13] = np.inf, -np.inf       # Inf flips sign: a change, not a new Inf
    a[14], b[14] = 2.0, np.inf           # Inf appears
    a[15] = b[15] = np.inf               # Inf stays
    b[2000:3000] = a[2000:3000]          # one identical stretch inside a changed chunk
    c, n = measured("c", a, b, *tol), measured("numpy", a, b, *tol)
    same_numbers(c, n)
    assert (c.nan_new, c.inf_new) == (1, 1)
    # an identical chunk with non-finite values only adds its finite ones to ||old||
    c, n = measured("c", a, None), measured("numpy", a, None)
    assert c.finite_both == n.finite_both == 4096 - 4  # old has 2 NaN, 2 Inf
    assert math.isclose(c.old_norm.scale * math.sqrt(c.old_norm.ssq),
                        n.old_norm.scale * math.sqrt(n.old_norm.ssq), rel_tol=1e-12)


@needs_c
@pytest.mark.parametrize("dt", ALL)
def test_unaligned_buffers(dt):
    """A tensor in a file starts at any byte offset; the C loads must not assume alignment."""
    rng = np.random.default_rng(5)
    a = (rng.standard_normal(3001) * 20).astype(dt)
    b = (rng.standard_normal(3001) * 20).astype(dt)
    raw_a = b"\x00" + a.tobytes()
    raw_b = b"\x00\x00\x00" + b.tobytes()
    s = stats.DeltaStats(dtypes.from_numpy(a.dtype))
    s.add_changed(memoryview(raw_a)[1:], memoryview(raw_b)[3:])
    same_numbers(s, measured("numpy", a, b))


@needs_c
def test_float16_measures_right_as_the_first_call_of_a_process():
    """The float16 table is built when first needed, not at import: a fresh process whose
    first call measures two float16 chunks gets numpy's numbers, and so does a later decode."""
    import subprocess
    import sys

    code = """
import json, numpy as np
from ckptdiff import _cstats as c
k = c.KINDS.index("float16")
a = (np.arange(-2048, 2048, dtype=np.float32) / 7).astype(np.float16)
b = a.copy()
b[::3] *= np.float16(1.5)
b[5], b[7] = np.inf, np.nan
r = c.measure(k, a.tobytes(), b.tobytes(), 0.0, 0.0)
print(json.dumps([r[0], r[3], r[4], r[5], r[6], c.decode(k, a[:1024].tobytes())]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    changed, max_abs, sum_abs, nan_new, inf_new, decoded = json.loads(out)
    a = (np.arange(-2048, 2048, dtype=np.float32) / 7).astype(np.float16)
    b = a.copy()
    b[::3] *= np.float16(1.5)
    b[5], b[7] = np.inf, np.nan
    assert changed == int((a.view(np.uint16) != b.view(np.uint16)).sum())
    assert (nan_new, inf_new) == (1, 1)
    finite = np.isfinite(b)
    delta = np.abs(b[finite].astype(np.float64) - a[finite].astype(np.float64))
    assert max_abs == delta.max()
    assert math.isclose(sum_abs, float(delta.sum()), rel_tol=1e-12)
    assert decoded == a[:1024].astype(np.float64).tolist()


@needs_c
def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="differ in length"):
        cstats.measure(1, b"\0" * 8, b"\0" * 4, 0.0, 0.0)
    with pytest.raises(ValueError, match="whole number"):
        cstats.measure(1, b"\0" * 6, b"\0" * 6, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown kind"):
        cstats.measure(99, b"", None, 0.0, 0.0)
    with pytest.raises(TypeError):
        cstats.measure(1, "not bytes", None, 0.0, 0.0)
    assert cstats.measure(1, b"", b"", 0.0, 0.0)[:3] == (0, 0, 0)


@needs_c
def test_the_c_module_lets_other_threads_run():
    """It releases the GIL while measuring, so the engine's two workers overlap."""
    import threading
    import time

    a = np.zeros(1 << 24, np.float32)
    b = np.ones(1 << 24, np.float32)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=tick)
    t.start()
    try:
        time.sleep(0.01)
        before = len(ticks)
        start = time.perf_counter()
        for _ in range(4):  # a window of ~0.1 s or more, even on a fast machine
            r = cstats.measure(kind(np.float32), a, b, 0.0, 0.0)
        end = time.perf_counter()
        during = sum(1 for x in ticks[before:] if start < x < end)
    finally:
        stop.set()
        t.join()
    assert r[0] == 1 << 24 and r[3] == 1.0
    assert during >= 2  # the ticker ran while a 128 MiB pair was measured


@needs_c
@settings(max_examples=400, deadline=None)
@given(
    dt=st.sampled_from(ALL),
    data=st.data(),
    tol=st.sampled_from([(0.0, 0.0), (1e-3, 0.0), (0.0, 0.25)]),
)
def test_arbitrary_bit_patterns_measure_the_same_in_c_and_numpy(dt, data, tol):
    """Raw random bytes: every NaN payload, subnormal, infinity and 1e±308 float64
    the formats can hold, in blocks that straddle the C module's 1,024 elements."""
    size = np.dtype(dt).itemsize
    n = data.draw(st.integers(0, 2100), label="elements")
    raw_a = data.draw(st.binary(min_size=n * size, max_size=n * size), label="old")
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(n * size - 1, 0)), st.integers(1, 255)),
                               max_size=20), label="flips")
    b = bytearray(raw_a)
    for pos, bit in flips:
        if b:
            b[pos] ^= bit
    a_arr = np.frombuffer(raw_a, dtype=dt)
    b_arr = np.frombuffer(bytes(b), dtype=dt)
    with np.errstate(all="ignore"):
        same_numbers(measured("c", a_arr, b_arr, *tol), measured("numpy", a_arr, b_arr, *tol))
        c, nump = measured("c", a_arr, None), measured("numpy", a_arr, None)
    assert c.finite_both == nump.finite_both
    on_c, on_n = c.old_norm, nump.old_norm
    assert on_c.is_zero == on_n.is_zero
    if not on_c.is_zero:
        ratio = (on_c.scale / on_n.scale) * math.sqrt(on_c.ssq / on_n.ssq)
        assert math.isclose(ratio, 1.0, rel_tol=1e-12)


def _cause_sums(backend: str, a: np.ndarray, b: np.ndarray, chunk: int) -> stats.DeltaStats:
    """The cause sums of a 2-D pair fed in ``chunk``-byte chunks, identical chunks as the engine feeds them."""
    saved = stats._C_KIND
    stats._C_KIND = stats._C_KIND if backend == "c" else {}
    try:
        s = stats.DeltaStats(dtypes.from_numpy(a.dtype), row_len=a.shape[1])
    finally:
        stats._C_KIND = saved
    ra, rb = a.tobytes(), b.tobytes()
    same = []
    for off in range(0, len(ra), chunk):
        ca, cb = memoryview(ra)[off:off + chunk], memoryview(rb)[off:off + chunk]
        if ca == cb:
            same.append(ca)
        else:
            s.add_changed(ca, cb, off)
    for ca in same:
        s.add_identical(ca)
    return s


@needs_c
@pytest.mark.parametrize("dt", ALL)
def test_cause_sums_agree_between_c_and_numpy(dt):
    """Σ old·Δ, the round-trip mask and the changed rows: the same from both implementations,
    for every dtype, over chunk boundaries that cut rows, with NaN/Inf where the dtype has them."""
    rng = np.random.default_rng(11)
    with np.errstate(all="ignore"):
        a = (rng.standard_normal((300, 37)) * 4).astype(dt)
        b = a.copy()
        b[[0, 5, 6, 140, 299], 3] = (rng.standard_normal(5) * 4).astype(dt)
        b[200:260] = (a[200:260].astype(np.float64) * 0.5).astype(dt)
        if np.dtype(dt).kind == "f":
            b[7, 1] = np.nan
    itemsize = np.dtype(dt).itemsize
    for chunk in (itemsize * 37 * 50 + itemsize * 3, 1 << 20):
        c, n = _cause_sums("c", a, b, chunk), _cause_sums("numpy", a, b, chunk)
        same_numbers(c, n)
        assert c.round_mask == n.round_mask
        assert (c.changed_rows, c.first_rows) == (n.changed_rows, n.first_rows)
        assert math.isclose(c.sum_old_delta, n.sum_old_delta, rel_tol=1e-9, abs_tol=1e-300)
        rows = np.flatnonzero((a.view(np.uint8).reshape(300, -1) != b.view(np.uint8).reshape(300, -1)).any(1))
        assert c.changed_rows == rows.size and c.first_rows == list(rows[:stats.FIRST_ROWS])
        fin = np.isfinite(a.astype(np.float64)) & np.isfinite(b.astype(np.float64))
        x, y = a.astype(np.float64)[fin], b.astype(np.float64)[fin]
        assert math.isclose(c.sum_old_delta, float(np.sum(x * (y - x))), rel_tol=1e-9, abs_tol=1e-12)


@needs_c
@pytest.mark.parametrize("through", [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
@pytest.mark.parametrize("src", [np.float32, np.float64])
def test_round_trip_mask_matches_ml_dtypes_rounding(src, through):
    """ml_dtypes rounds to nearest even: a float32 tensor cast through it and back is found by
    both implementations, and nothing else is; float64 too (cast via float32 double-rounds
    only at ties, which random values avoid)."""
    rng = np.random.default_rng(12)
    a = (rng.standard_normal((64, 64)) * 3).astype(src)
    with np.errstate(all="ignore"):
        b = a.astype(through).astype(src)
    names = stats_types.ROUND_NAMES
    for backend in ("c", "numpy"):
        s = _cause_sums(backend, a, b, 1 << 20)
        found = [names[i] for i in range(len(names)) if s.round_mask >> i & 1]
        assert found == [dtypes.from_numpy(np.dtype(through)).name], (backend, found)
