"""The diff engine against an independent numpy float64 reference, plus every status and edge case."""

from __future__ import annotations

import math
import os
import tracemalloc
from unittest import mock

import blake3
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptdiff
from ckptdiff import Checkpoint, CkptError, Manifest, TensorRef, compare, stats, stats_numpy  # the kernel modules
from ckptdiff import diff

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
          ml_dtypes.float8_e5m2, np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16,
          np.uint32, np.uint64, np.bool_]


def ck(**arrays: np.ndarray) -> Checkpoint:
    return Checkpoint.from_arrays(arrays)


def one(rep, name: str = "t"):
    (t,) = [t for t in rep.tensors if t.name == name]
    return t


# ---------------------------------------------------------------------------
# reference: whole arrays, float64, no chunking, no cleverness
# ---------------------------------------------------------------------------

def reference(a: np.ndarray, b: np.ndarray, atol: float = 0.0, rtol: float = 0.0) -> dict:
    with np.errstate(all="ignore"):
        return _reference(a, b, atol, rtol)


def _reference(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> dict:
    u = UINT[a.dtype.itemsize]
    neq = a.reshape(-1).view(u) != b.reshape(-1).view(u)
    a64 = a.reshape(-1).astype(np.float64)
    b64 = b.reshape(-1).astype(np.float64)
    isfloat = a.dtype.kind == "f" or a.dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
    fa, fb = np.isfinite(a64), np.isfinite(b64)
    both = fa & fb
    dfull = np.abs(b64 - a64)
    d = dfull[both]
    n = int(both.sum())
    old_fin = a64[both]
    num, den = math.hypot(*d.tolist()), math.hypot(*old_fin.tolist())
    rel = (0.0 if num == 0 else math.inf) if den == 0 else num / den
    if atol == 0 and rtol == 0:
        oot = int(neq.sum())
    else:
        within = both & (dfull <= atol + rtol * np.abs(a64))
        both_nan = np.isnan(a64) & np.isnan(b64)
        oot = int((neq & ~within & ~both_nan).sum())
    return {
        "changed_elements": int(neq.sum()),
        "max_abs_delta": (float(d.max()) if d.size else 0.0) if n else None,
        "mean_abs_delta": float(d.sum()) / n if n else None,
        "rel_l2": rel if n else None,
        "nan_new": int((np.isnan(b64) & ~np.isnan(a64)).sum()) if isfloat else 0,
        "inf_new": int((np.isinf(b64) & ~np.isinf(a64)).sum()) if isfloat else 0,
        "out_of_tolerance": oot,
    }


def close(x, y) -> bool:
    if x is None or y is None:
        return x is y
    if math.isinf(x) or math.isinf(y) or math.isnan(x) or math.isnan(y):
        return (math.isnan(x) and math.isnan(y)) or x == y
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300)


def random_array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    """Random values: raw bit patterns for narrow floats (covering NaN/Inf/subnormals), scaled normals + specials for wide ones."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if shape else 1
    if dt == np.bool_:
        return rng.integers(0, 2, n).astype(np.bool_).reshape(shape)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, n, dtype=dt, endpoint=True).reshape(shape)
    if dt.itemsize <= 2:
        return rng.integers(0, 1 << (8 * dt.itemsize), n, dtype=np.uint64).astype(UINT[dt.itemsize]).view(dt).reshape(shape)
    vals = rng.standard_normal(n) * 10.0 ** rng.uniform(-20, 20, n)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324 if dt.itemsize == 8 else 1e-45])
    pick = rng.random(n) < 0.05
    vals[pick] = rng.choice(specials, int(pick.sum()))
    return vals.astype(dt).reshape(shape)


def perturb(rng: np.random.Generator, a: np.ndarray, frac: float) -> np.ndarray:
    b = a.copy().reshape(-1)
    n = b.size
    mask = rng.random(n) < frac
    if not mask.any():
        return b.reshape(a.shape)
    fresh = random_array(rng, a.dtype, (n,))
    u = UINT[a.dtype.itemsize]
    mode = rng.integers(0, 3)
    if mode == 0 or a.dtype == np.bool_:
        b[mask] = fresh[mask]
    elif mode == 1:  # one-ulp style bit flips in the lowest bit
        bu = b.view(u)
        bu[mask] ^= u(1)
    else:  # mixture
        bu = b.view(u)
        half = mask & (rng.random(n) < 0.5)
        bu[half] ^= u(1)
        b[mask & ~half] = fresh[mask & ~half]
    return b.reshape(a.shape)


shapes = st.one_of(
    st.just(()), st.just((0,)), st.just((3, 0)),
    st.lists(st.integers(1, 37), min_size=1, max_size=3).map(tuple),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    frac=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    chunk_items=st.sampled_from([1, 3, 16, 1 << 20]),
    tol=st.sampled_from([(0.0, 0.0), (1e-3, 0.0), (0.0, 1e-2), (0.5, 0.1)]),
    block=st.sampled_from([stats_numpy.STATS_BLOCK, 5, 64]),
    backend=st.sampled_from(["c", "numpy"]),
)
def test_statistics_match_numpy_float64(dtype, shape, seed, frac, chunk_items, tol, block, backend):
    """Both implementations (the C module, numpy) against an independent float64 reference."""
    if backend == "c" and stats.backend() != "c":
        pytest.skip("the C statistics module is not in use (not built, or CKPTDIFF_STATS=numpy)")
    rng = np.random.default_rng(seed)
    a = random_array(rng, dtype, shape)
    b = perturb(rng, a, frac)
    atol, rtol = tol
    kinds = stats._C_KIND if backend == "c" else {}
    with mock.patch.object(stats_numpy, "STATS_BLOCK", block), mock.patch.object(stats, "_C_KIND", kinds):
        rep = diff(ck(t=a), ck(t=b), atol=atol, rtol=rtol, chunk_bytes=chunk_items * np.dtype(dtype).itemsize)
    t = one(rep)
    assert t.hash_old == blake3.blake3(a.tobytes()).hexdigest()
    assert t.hash_new == blake3.blake3(b.tobytes()).hexdigest()
    assert t.numel == a.size
    ref = reference(a, b, atol, rtol)
    if ref["changed_elements"] == 0:
        assert t.status == "identical"
        assert t.max_abs_delta is t.changed_elements is t.rel_l2 is None
        return
    assert t.status == "changed"
    for key in ("changed_elements", "nan_new", "inf_new", "out_of_tolerance"):
        assert getattr(t, key) == ref[key], key
    for key in ("max_abs_delta", "mean_abs_delta", "rel_l2"):
        assert close(getattr(t, key), ref[key]), (key, getattr(t, key), ref[key])


# ---------------------------------------------------------------------------
# statuses and ordering
# ---------------------------------------------------------------------------

def test_every_status_and_union_order():
    old = ck(same=np.arange(4, dtype=np.float32), moved=np.ones(3), gone=np.zeros(2, np.int8),
             reshaped=np.zeros((2, 3), np.float32), retyped=np.zeros(4, np.float32))
    new = ck(fresh=np.ones(5, np.uint8), retyped=np.zeros(4, np.float16), same=np.arange(4, dtype=np.float32),
             moved=np.array([1.0, 2.0, 1.0]), reshaped=np.zeros((3, 2), np.float32))
    rep = diff(old, new)
    assert [t.name for t in rep.tensors] == ["same", "moved", "gone", "reshaped", "retyped", "fresh"]
    assert {t.name: t.status for t in rep.tensors} == {
        "same": "identical", "moved": "changed", "gone": "removed", "reshaped": "shape_changed",
        "retyped": "dtype_changed", "fresh": "added"}
    s = rep.summary()
    assert (s["identical"], s["changed"], s["added"], s["removed"], s["shape_changed"], s["dtype_changed"]) == (1, 1, 1, 1, 1, 1)
    gone, fresh = one(rep, "gone"), one(rep, "fresh")
    assert gone.hash_old == blake3.blake3(np.zeros(2, np.int8).tobytes()).hexdigest() and gone.hash_new is None
    assert fresh.hash_new == blake3.blake3(np.ones(5, np.uint8).tobytes()).hexdigest() and fresh.hash_old is None
    assert (fresh.numel, gone.numel) == (5, 2)
    r = one(rep, "reshaped")
    assert r.shape_old == [2, 3] and r.shape_new == [3, 2] and r.max_abs_delta is None
    d = one(rep, "retyped")
    assert (d.dtype_old, d.dtype_new) == ("float32", "float16")
    m = one(rep, "moved")
    assert (m.changed_elements, m.max_abs_delta, m.mean_abs_delta) == (1, 1.0, 1 / 3)
    assert m.rel_l2 == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    # no manifest: roles unknown, nothing drifts, any change fails
    assert all(t.role == "unknown" and not t.drift and not t.stale for t in rep.tensors)
    assert rep.fail_on == "change" and rep.exit_code == 1
    assert rep.old.tensors == 5 and rep.new.bytes == 5 + 8 + 16 + 24 + 24


def test_identical_checkpoints_pass():
    arrays = {"a": np.linspace(0, 1, 1000, dtype=np.float32), "b": np.arange(7)}
    rep = diff(ck(**arrays), ck(**{k: v.copy() for k, v in arrays.items()}))
    assert [t.status for t in rep.tensors] == ["identical", "identical"]
    assert rep.exit_code == 0 and not rep.failed
    assert all(t.hash_old == t.hash_new for t in rep.tensors)


# ---------------------------------------------------------------------------
# bitwise edge cases
# ---------------------------------------------------------------------------

def test_single_ulp_is_a_change():
    a = np.full(100, 0.1678, np.float32)
    b = a.copy()
    b[42] = np.nextafter(b[42], np.float32(1))
    t = one(diff(ck(t=a), ck(t=b)))
    assert t.status == "changed" and t.changed_elements == 1
    assert t.max_abs_delta == float(np.float64(b[42]) - np.float64(a[42])) > 0


def test_signed_zero_is_a_change_with_zero_delta():
    t = one(diff(ck(t=np.array([0.0, 1.0])), ck(t=np.array([-0.0, 1.0]))))
    assert t.status == "changed" and t.changed_elements == 1
    assert t.max_abs_delta == 0.0 and t.rel_l2 == 0.0 and t.mean_abs_delta == 0.0


def test_same_nan_bits_are_identical_other_payload_is_a_change():
    nan1 = np.array([0x7FC00000], np.uint32).view(np.float32)
    nan2 = np.array([0x7FC00001], np.uint32).view(np.float32)
    a = np.array([1.0, nan1[0]], np.float32)
    assert one(diff(ck(t=a), ck(t=a.copy()))).status == "identical"
    b = a.copy()
    b[1] = nan2[0]
    t = one(diff(ck(t=a), ck(t=b)))
    assert t.status == "changed" and t.changed_elements == 1 and t.nan_new == 0
    assert t.max_abs_delta == 0.0  # the only finite-on-both position did not move


def test_nan_and_inf_introduced_are_counted_and_excluded_from_deltas():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([np.nan, np.inf, 3.5, 4.0])
    t = one(diff(ck(t=a), ck(t=b)))
    assert (t.changed_elements, t.nan_new, t.inf_new) == (3, 1, 1)
    # over positions finite on both sides: [3, 4] -> [3.5, 4]
    assert t.max_abs_delta == 0.5 and t.mean_abs_delta == 0.25
    assert t.rel_l2 == pytest.approx(0.5 / 5.0)


def test_all_positions_non_finite_gives_null_statistics():
    t = one(diff(ck(t=np.array([1.0])), ck(t=np.array([np.nan]))))
    assert t.status == "changed" and t.nan_new == 1
    assert t.max_abs_delta is None and t.mean_abs_delta is None and t.rel_l2 is None


def test_rel_l2_is_inf_when_old_is_zero():
    rep = diff(ck(t=np.zeros(4, np.float32)), ck(t=np.array([0, 0, 1e-3, 0], np.float32)))
    assert one(rep).rel_l2 == math.inf
    assert '"rel_l2": "inf"' in rep.to_json()  # JSON has no Infinity: written as a string


def test_float64_extremes_do_not_overflow_or_underflow():
    a = np.array([1e200, -3e200, 2e200])
    b = a * (1 + 1e-6)
    t = one(diff(ck(t=a), ck(t=b)))
    assert t.rel_l2 == pytest.approx(1e-6, rel=1e-6)
    a = np.array([1e-200, -3e-200, 2e-200])
    b = a * (1 + 1e-3)
    t = one(diff(ck(t=a), ck(t=b), chunk_bytes=8))
    assert t.rel_l2 == pytest.approx(1e-3, rel=1e-6)


def test_empty_and_zero_d_tensors():
    rep = diff(ck(e=np.zeros((0, 4), np.float16), s=np.float32(1.5)),
               ck(e=np.zeros((0, 4), np.float16), s=np.float32(2.5)))
    e, s = one(rep, "e"), one(rep, "s")
    assert e.status == "identical" and e.numel == 0 and e.hash_old == blake3.blake3(b"").hexdigest()
    assert s.status == "changed" and s.shape_old == [] and s.numel == 1 and s.max_abs_delta == 1.0


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.float16])
def test_narrow_floats_accumulate_in_float64(dtype):
    a = np.linspace(-2, 2, 257).astype(dtype)
    b = (a.astype(np.float32) * 1.25).astype(dtype)
    t = one(diff(ck(t=a), ck(t=b), chunk_bytes=7 * np.dtype(dtype).itemsize))
    ref = reference(a, b)
    assert t.changed_elements == ref["changed_elements"] > 0
    assert t.max_abs_delta == ref["max_abs_delta"]
    assert close(t.rel_l2, ref["rel_l2"]) and close(t.mean_abs_delta, ref["mean_abs_delta"])


def test_large_integers_and_bool():
    a = np.array([np.iinfo(np.int64).min, 0, 5], np.int64)
    b = np.array([np.iinfo(np.int64).max, 0, 6], np.int64)
    t = one(diff(ck(t=a), ck(t=b)))
    assert t.changed_elements == 2 and t.max_abs_delta == pytest.approx(2.0**64)
    t = one(diff(ck(t=np.array([True, False, True])), ck(t=np.array([True, True, False]))))
    assert (t.changed_elements, t.max_abs_delta, t.mean_abs_delta) == (2, 1.0, 2 / 3)
    assert t.rel_l2 == pytest.approx(math.sqrt(2) / math.sqrt(2))


# ---------------------------------------------------------------------------
# streaming, chunk boundaries, known hashes, progress
# ---------------------------------------------------------------------------

def pieces_ref(name: str, arr: np.ndarray, sizes=(5, 1, 13), hash_: str | None = None, explode: bool = False) -> TensorRef:
    raw = arr.tobytes()

    def gen():
        if explode:
            raise AssertionError("bytes read although the hashes were known")
        i = k = 0
        while i < len(raw):
            n = sizes[k % len(sizes)]
            yield raw[i:i + n]
            i += n
            k += 1

    from ckptdiff.dtypes import from_numpy
    return TensorRef(name, from_numpy(arr.dtype).name, arr.shape, pieces=gen, hash=hash_)


@pytest.mark.parametrize("chunk_bytes", [4, 12, 40, 4 << 20])
def test_change_only_in_one_chunk_still_uses_the_whole_old_norm(chunk_bytes):
    a = np.arange(1, 101, dtype=np.float32)
    b = a.copy()
    b[0] += 1.0   # only the first chunk differs; the others are revisited for ||old||
    b[99] += 2.0  # and the last
    t = one(diff(ck(t=a), ck(t=b), chunk_bytes=chunk_bytes))
    assert t.changed_elements == 2 and t.max_abs_delta == 2.0 and t.mean_abs_delta == pytest.approx(3 / 100)
    assert t.rel_l2 == pytest.approx(math.sqrt(5) / np.linalg.norm(a.astype(np.float64)), rel=1e-12)


def test_pieces_and_views_chunk_alike():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(1000).astype(np.float32)
    b = perturb(rng, a, 0.2)
    expected = one(diff(ck(t=a), ck(t=b)))
    old = Checkpoint("<p>", "memory", {"t": pieces_ref("t", a)})
    for chunk_bytes in (4, 28, 4096):
        t = one(diff(old, ck(t=b), chunk_bytes=chunk_bytes))
        assert (t.hash_old, t.hash_new, t.changed_elements) == (expected.hash_old, expected.hash_new, expected.changed_elements)
        assert close(t.rel_l2, expected.rel_l2) and close(t.mean_abs_delta, expected.mean_abs_delta)
        assert t.max_abs_delta == expected.max_abs_delta


def test_equal_known_hashes_short_circuit_without_reading():
    a = np.ones(10, np.float32)
    h = blake3.blake3(a.tobytes()).hexdigest()
    old = Checkpoint("s1", "store", {"t": pieces_ref("t", a, hash_=h, explode=True)})
    new = Checkpoint("s2", "store", {"t": pieces_ref("t", a, hash_=h, explode=True)})
    t = one(diff(old, new))
    assert t.status == "identical" and t.hash_old == t.hash_new == h


def test_different_known_hashes_still_measure():
    a, b = np.ones(10, np.float32), np.full(10, 1.5, np.float32)
    old = Checkpoint("s1", "store", {"t": pieces_ref("t", a, hash_="h-old")})
    new = Checkpoint("s2", "store", {"t": pieces_ref("t", b, hash_="h-new")})
    t = one(diff(old, new))
    assert t.status == "changed" and (t.hash_old, t.hash_new) == ("h-old", "h-new") and t.max_abs_delta == 0.5


def test_progress_reports_bytes_monotonically_to_the_total():
    a = {"x": np.zeros(1000, np.float32), "y": np.ones(10), "z": np.zeros(3, np.int8)}
    b = {"x": np.ones(1000, np.float32), "y": np.ones(10), "w": np.ones(2, np.int16)}
    calls: list[tuple[int, int]] = []
    diff(ck(**a), ck(**b), chunk_bytes=256, progress=lambda d, t: calls.append((d, t)))
    total = 4000 * 2 + 80 * 2 + 3 + 4
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len(calls) > 10


def test_memory_does_not_grow_with_tensor_size():
    """Two 96 MiB tensors that exist only as generated pieces diff within a few chunks of memory."""
    n_chunks, piece = 24, 4 << 20

    def make(offset: float) -> TensorRef:
        def gen():
            for i in range(n_chunks):
                yield (np.full(piece // 4, i, np.float32) + np.float32(offset * (i % 2))).tobytes()
        return TensorRef("big", "float32", (n_chunks * piece // 4,), pieces=gen)

    old = Checkpoint("a", "gen", {"big": make(0.0)})
    new = Checkpoint("b", "gen", {"big": make(0.5)})
    tracemalloc.start()
    try:
        t = one(diff(old, new), "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert t.changed_elements == n_chunks // 2 * piece // 4 and t.max_abs_delta == 0.5
    print(f"peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < 48 << 20, f"peak traced memory {peak / 2**20:.0f} MiB for 192 MiB of input"


# ---------------------------------------------------------------------------
# manifest: roles, drift, stale, tolerance
# ---------------------------------------------------------------------------

def finetune_pair():
    old = {"backbone.w": np.full(8, 0.1678, np.float32), "backbone.b": np.zeros(8, np.float32),
           "head.w": np.ones(4, np.float32), "head.b": np.zeros(4, np.float32),
           "bn.running_mean": np.zeros(8, np.float32)}
    new = {k: v.copy() for k, v in old.items()}
    new["backbone.w"][3] = 0.1674          # the classic tiny AdamW decay
    new["head.w"] += 0.5                    # trained, as intended
    new["bn.running_mean"] += 0.01          # buffer: allowed to move
    return old, new


def test_drift_and_stale_from_a_manifest():
    old, new = finetune_pair()
    man = Manifest(trainable=("head.*",), buffers=("*.running_*",))
    rep = diff(ck(**old), ck(**new), manifest=man)
    roles = {t.name: (t.role, t.status, t.drift, t.stale) for t in rep.tensors}
    assert roles == {
        "backbone.w": ("frozen", "changed", True, False),
        "backbone.b": ("frozen", "identical", False, False),
        "head.w": ("trainable", "changed", False, False),
        "head.b": ("trainable", "identical", False, True),
        "bn.running_mean": ("buffer", "changed", False, False),
    }
    assert [t.name for t in rep.drifted] == ["backbone.w"] and [t.name for t in rep.stale] == ["head.b"]
    assert rep.fail_on == "drift" and rep.exit_code == 1
    bw = one(rep, "backbone.w")
    assert bw.max_abs_delta == pytest.approx(0.0004, abs=1e-7)


def test_tolerance_decides_drift_but_never_hides_the_change():
    old, new = finetune_pair()
    man = {"trainable": ["head.*"], "buffers": ["*.running_*"]}
    loose = diff(ck(**old), ck(**new), manifest=man, atol=1e-3)
    bw = one(loose, "backbone.w")
    assert bw.status == "changed" and bw.changed_elements == 1 and bw.out_of_tolerance == 0
    assert not bw.drift and bw.max_abs_delta == pytest.approx(0.0004, abs=1e-7)
    assert loose.exit_code == 0
    tight = diff(ck(**old), ck(**new), manifest=man, atol=1e-4)
    assert one(tight, "backbone.w").drift and one(tight, "backbone.w").out_of_tolerance == 1
    # rtol is relative to |old|: 0.0004 / 0.1678 = 0.24%
    assert not one(diff(ck(**old), ck(**new), manifest=man, rtol=3e-3), "backbone.w").drift
    assert one(diff(ck(**old), ck(**new), manifest=man, rtol=2e-3), "backbone.w").drift


def test_nan_in_frozen_tensor_drifts_whatever_the_tolerance():
    a = np.ones(4, np.float32)
    b = a.copy()
    b[2] = np.nan
    rep = diff(ck(w=a), ck(w=b), manifest={"frozen": ["w"]}, atol=1e9, rtol=1e9)
    t = one(rep, "w")
    assert t.role == "frozen" and t.drift and t.nan_new == 1 and t.out_of_tolerance == 1


def test_signed_zero_drifts_at_zero_tolerance_only():
    man = {"frozen": ["*"]}
    a, b = np.array([0.0], np.float32), np.array([-0.0], np.float32)
    assert one(diff(ck(w=a), ck(w=b), manifest=man), "w").drift
    assert not one(diff(ck(w=a), ck(w=b), manifest=man, atol=1e-12), "w").drift


def test_frozen_removed_reshaped_retyped_drift_but_added_does_not():
    man = {"trainable": ["lora.*"]}
    old = ck(a=np.zeros(2), b=np.zeros(2), c=np.zeros(2))
    new = ck(b=np.zeros(3), c=np.zeros(2, np.float32), **{"lora.A": np.ones(2), "extra": np.ones(1)})
    rep = diff(old, new, manifest=man)
    assert {t.name: t.drift for t in rep.tensors} == {"a": True, "b": True, "c": True, "lora.A": False, "extra": False}


def test_buffers_and_unknown_roles_never_drift_or_go_stale():
    man = {"trainable": ["t"], "frozen": ["f"], "buffers": ["buf"]}
    old = ck(t=np.ones(2), f=np.ones(2), buf=np.ones(2), other=np.ones(2))
    new = ck(t=np.ones(2), f=np.ones(2), buf=np.zeros(2), other=np.zeros(2))
    rep = diff(old, new, manifest=man)
    got = {t.name: (t.role, t.drift, t.stale) for t in rep.tensors}
    assert got == {"t": ("trainable", False, True), "f": ("frozen", False, False),
                   "buf": ("buffer", False, False), "other": ("unknown", False, False)}
    assert rep.exit_code == 0  # fail_on drift, nothing drifted


def test_manifest_resolution_order(tmp_path):
    emb_new = Manifest(trainable=("a",), source="embedded new")
    emb_old = Manifest(trainable=("b",), source="embedded old")
    old = Checkpoint.from_arrays({"a": np.ones(1), "b": np.ones(1)}, manifest=emb_old)
    new = Checkpoint.from_arrays({"a": np.ones(1), "b": np.ones(1)}, manifest=emb_new)
    assert diff(old, new).manifest_source == "embedded new"
    assert one(diff(old, new), "a").role == "trainable"
    plain = Checkpoint.from_arrays({"a": np.ones(1), "b": np.ones(1)})
    assert diff(old, plain).manifest_source == "embedded old"
    f = tmp_path / "m.json"
    f.write_text('{"trainable": ["b"]}')
    rep = diff(old, new, manifest=f)
    assert rep.manifest_source == str(f) and one(rep, "a").role == "frozen"
    assert diff(plain, plain).manifest_source is None


def test_fail_on_policies():
    old, new = finetune_pair()
    man = {"trainable": ["head.*"], "buffers": ["*.running_*"]}
    assert diff(ck(**old), ck(**new), manifest=man, fail_on="never").exit_code == 0
    rep = diff(ck(**old), ck(**new), manifest=man, fail_on="change")
    failed, reasons = rep.verdict()
    assert failed and len(reasons) == 3
    del new["backbone.w"]
    assert diff(ck(**old), ck(**new), manifest=man).exit_code == 1  # removed frozen tensor


def test_include_and_exclude_globs():
    old, new = finetune_pair()
    rep = diff(ck(**old), ck(**new), include=["backbone.*", "bn.*"], exclude=["*.b", "*running*"])
    assert [t.name for t in rep.tensors] == ["backbone.w"]
    assert rep.extra["include"] == ["backbone.*", "bn.*"]
    rep = diff(ck(**old), ck(**new), exclude="head.*")
    assert [t.name for t in rep.tensors] == ["backbone.w", "backbone.b", "bn.running_mean"]


def test_include_that_selects_nothing_is_an_error_not_a_pass():
    from ckptdiff.errors import NothingSelected

    old, new = finetune_pair()
    with pytest.raises(NothingSelected, match=r"include=\['encoder\.\*'\] selected none of the tensors "
                                              r"\(5 in OLD, 5 in NEW\)") as e:
        diff(ck(**old), ck(**new), include=["encoder.*"])
    assert isinstance(e.value, CkptError) and (e.value.n_old, e.value.n_new) == (5, 5)
    with pytest.raises(NothingSelected, match="with exclude"):  # include matched, exclude took it all
        diff(ck(**old), ck(**new), include=["head.*"], exclude=["head.*"])
    # two empty checkpoints: nothing to select from, nothing to complain about
    assert diff(ck(), ck(), include=["encoder.*"]).tensors == []
    # exclude alone may legitimately leave nothing
    assert diff(ck(**old), ck(**new), exclude=["*"]).tensors == []


@pytest.mark.parametrize("kwargs", [{"atol": -1}, {"rtol": float("nan")}, {"atol": float("inf")},
                                    {"atol": "x"}, {"fail_on": "sometimes"}])
def test_bad_arguments_are_ckpt_errors(kwargs):
    with pytest.raises(CkptError):
        diff(ck(t=np.ones(1)), ck(t=np.ones(1)), **kwargs)


def test_bad_manifest_file_is_a_ckpt_error(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(CkptError, match="not valid JSON"):
        diff(ck(t=np.ones(1)), ck(t=np.ones(1)), manifest=bad)
    with pytest.raises(CkptError, match="not found"):
        diff(ck(t=np.ones(1)), ck(t=np.ones(1)), manifest=tmp_path / "missing.json")


def test_paths_are_opened_and_closed(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.arange(6, dtype=np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"w": np.arange(6, dtype=np.float32) * 2}, str(tmp_path / "b.safetensors"))
    rep = ckptdiff.diff(str(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    t = one(rep, "w")
    assert rep.old.format == "safetensors" and t.status == "changed" and t.max_abs_delta == 5.0
    assert t.changed_elements == 5  # 0 * 2 == 0
    with pytest.raises(CkptError):
        ckptdiff.diff(str(tmp_path / "a.safetensors"), str(tmp_path / "nope.safetensors"))


def test_a_source_that_runs_short_is_a_ckpt_error():
    a = np.arange(10, dtype=np.float32)
    short = TensorRef("t", "float32", (10,), pieces=lambda: iter([a.tobytes()[:36]]))
    with pytest.raises(CkptError, match="expected 40 bytes"):
        diff(Checkpoint("x", "m", {"t": short}), ck(t=a))
    with pytest.raises(CkptError, match="expected 40 bytes"):
        diff(Checkpoint("x", "m", {"t": short}), ck(u=a))  # removed: hashed alone


def test_public_api_is_the_function():
    import ckptdiff.api
    import ckptdiff.engine  # noqa: F401  importing the modules must not shadow the function
    assert callable(ckptdiff.diff) and ckptdiff.diff.__name__ == "diff"
    assert ckptdiff.diff is ckptdiff.api.diff


def test_the_engine_takes_open_checkpoints_only(tmp_path):
    """Paths are resolved before the engine (ckptdiff.diff does it); the engine itself refuses them."""
    import ckptdiff.engine

    with pytest.raises(TypeError, match="open Checkpoints"):
        ckptdiff.engine.diff(str(tmp_path / "a.safetensors"), ck(t=np.ones(1)))
    with pytest.raises(TypeError, match="Manifest or None"):
        ckptdiff.engine.diff(ck(t=np.ones(1)), ck(t=np.ones(1)), manifest={"frozen": ["t"]})


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise RuntimeError("no RssFile")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc needed to read RssFile")
def test_mapped_file_pages_are_handed_back(tmp_path):
    """Diffing two 64 MiB safetensors files must not leave 128 MiB of file pages resident."""
    from safetensors.numpy import save_file
    big = np.arange(16 << 20, dtype=np.float32)
    save_file({"w": big, "v": big[:1000]}, str(tmp_path / "a.safetensors"))
    big[::7] += 1
    save_file({"w": big, "v": big[:1000]}, str(tmp_path / "b.safetensors"))
    del big
    from ckptdiff import open_checkpoint
    with open_checkpoint(tmp_path / "a.safetensors") as a, open_checkpoint(tmp_path / "b.safetensors") as b:
        before = _rss_file_kb()
        rep = diff(a, b)  # both maps stay open: what is resident now is what the walk left behind
        grown_mib = (_rss_file_kb() - before) / 1024
    assert one(rep, "w").changed_elements == len(range(0, 16 << 20, 7))
    assert grown_mib < 24, f"file-backed RSS grew by {grown_mib:.0f} MiB"


def test_release_pages_never_touches_writable_or_anonymous_memory(tmp_path):
    import mmap
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(1 << 16))
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes live only in memory
        mm[:4] = b"abcd"
        mm[20000:20004] = b"wxyz"
        compare.release_pages(memoryview(mm))
        assert mm[:4] == b"abcd" and mm[20000:20004] == b"wxyz"
        mm.close()
    arr = np.full(1 << 16, 7, np.uint8)
    compare.release_pages(memoryview(arr))
    assert (arr == 7).all()


def test_verdict_reasons_name_nan_and_inf():
    a = np.ones(3, np.float32)
    rep = diff(ck(w=a), ck(w=np.full(3, np.nan, np.float32)), manifest={"frozen": ["w"]})
    assert rep.verdict() == (True, ["frozen tensor w changed (max |Δ| n/a, 3 of 3 elements, 3 new NaN)"])
    b = a.copy()
    b[0] = np.inf
    rep = diff(ck(w=a), ck(w=b), fail_on="change")
    assert rep.verdict()[1] == ["tensor w changed (max |Δ| 0, 1 of 3 elements, 1 new Inf)"]
    assert '"failed": true' in rep.to_json()
