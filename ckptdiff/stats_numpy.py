"""The numpy implementation of :class:`ckptdiff.stats.DeltaStats` (the fallback).

Used when the C module ``ckptdiff._cstats`` was not built (no compiler at
install time) or ``CKPTDIFF_STATS=numpy`` is set; the numbers are the same
to float64 rounding (tested). Chunks are measured in blocks of
``STATS_BLOCK`` elements, converted to float64 in two reused buffers.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

from .stats_types import DeltaSums as DeltaStats  # the sums of a stats.DeltaStats, without importing it back
from .stats_types import FIRST_ROWS, _Norm

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_LOCAL = threading.local()


def _blas_single_threaded() -> bool:
    # OpenBLAS reads these once, when numpy loads it (just before this module ran).
    v = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return v is not None and v.strip() == "1"


#: np.dot is BLAS: 2.5x faster than einsum single-threaded (14 vs 35 us per
#: 128 Ki float64), but multithreaded BLAS spins its threads while the
#: engine's workers and BLAKE3 want the same cores (37 us per dot then, and
#: once 50x slower). The CLI sets OPENBLAS_NUM_THREADS=1 before numpy loads;
#: a library caller gets dot only if it did the same.
_DOT_OK = _blas_single_threaded()

#: Elements per statistics block: two float64 buffers of this size (2 MiB)
#: stay in cache through the ~10 passes a block needs, and are reused, so no
#: chunk-sized temporaries are allocated (and page-faulted) per chunk.
STATS_BLOCK = 1 << 17


def _sumsq(x: np.ndarray) -> float:
    return float(np.dot(x, x)) if _DOT_OK else float(np.einsum("i,i->", x, x))


def _norm_add(norm: _Norm, x: np.ndarray, careful: bool) -> None:
    """Add a block to a norm; ``careful`` (float64) scales values whose squares could overflow."""
    if x.size == 0:
        return
    if careful:
        m = float(np.max(np.abs(x)))
        if m == 0.0:
            return
        if m == math.inf:  # a delta that overflowed float64 itself
            norm._merge(math.inf, 1.0)
            return
        if not (1e-140 < m < 1e140):
            norm._merge(m, _sumsq(x / m))
            return
    norm._merge(1.0, _sumsq(x))


def _stats_buffers() -> tuple[np.ndarray, np.ndarray]:
    """This thread's float64 statistics blocks (see STATS_BLOCK), allocated once, not per tensor."""
    bufs = getattr(_LOCAL, "stats", None)
    if bufs is None or bufs[0].size != STATS_BLOCK:
        bufs = _LOCAL.stats = (np.empty(STATS_BLOCK, np.float64), np.empty(STATS_BLOCK, np.float64))
    return bufs


def _buffers(s: DeltaStats, n: int) -> tuple[np.ndarray, np.ndarray]:
    if s._bufs is None or s._bufs[0].size < n:
        s._bufs = _stats_buffers()
    return s._bufs[0][:n], s._bufs[1][:n]


def _careful(s: DeltaStats) -> bool:
    return s.dtype.itemsize == 8 and s.dtype.is_float


def _optimistic(s: DeltaStats) -> bool:
    """Narrow floats: measure first, look for NaN/Inf only if a sum came out non-finite.

    Squares and sums of float32/16/bf16/fp8 values cannot overflow float64,
    so the three block sums are finite exactly when every input is; the
    finiteness masks (four more passes) are then only built for the rare
    block that needs them. float64 can overflow and ints have no NaN, so
    they keep the plain paths.
    """
    return s.dtype.is_float and s.dtype.itemsize < 8


def add_identical(s: DeltaStats, chunk: memoryview) -> None:
    x = np.frombuffer(chunk, dtype=s.dtype.np_dtype)
    for i in range(0, x.size, STATS_BLOCK):
        if s.round_mask:
            _round_check(s, x[i:i + STATS_BLOCK], x[i:i + STATS_BLOCK])
        _old_only(s, x[i:i + STATS_BLOCK])


def add_changed(s: DeltaStats, ca: memoryview, cb: memoryview, elem_offset: int = 0) -> None:
    """Measure a chunk pair block by block.

    Unchanged positions inside a changed block contribute a delta of
    exactly 0, so whole blocks are measured (a fine-tune usually changes
    every element); blocks without a differing bit only add to ``||old||``.
    """
    u = _UINT_OF_SIZE[s.dtype.itemsize]
    ua, ub = np.frombuffer(ca, dtype=u), np.frombuffer(cb, dtype=u)
    xa, xb = np.frombuffer(ca, dtype=s.dtype.np_dtype), np.frombuffer(cb, dtype=s.dtype.np_dtype)
    for i in range(0, xa.size, STATS_BLOCK):
        e = i + STATS_BLOCK
        neq = ua[i:e] != ub[i:e]
        changed = int(np.count_nonzero(neq))
        if s.round_mask:
            _round_check(s, xa[i:e], xb[i:e])
        if changed:
            if s.row_len:
                _rows(s, neq, elem_offset + i)
            _changed_block(s, neq, changed, xa[i:e], xb[i:e])
        else:
            _old_only(s, xa[i:e])


#: (mantissa bits, smallest normal exponent, largest finite value, overflow gives NaN) of
#: each format in stats_types.ROUND_NAMES: the same table as _cstats.c's ROUND_FMT.
_ROUND_FMT = ((23, -126, 3.4028234663852886e38, False), (10, -14, 65504.0, False),
              (7, -126, 3.3895313892515355e38, False), (3, -6, 448.0, True), (2, -14, 57344.0, False))
#: Elements tried before a whole block: an ordinary update fails every format within a few.
_ROUND_PROBE = 64


def _round_to(f: int, x: np.ndarray) -> np.ndarray:
    """``x`` rounded to nearest even in format ``f``, in float64: the C module's round_to."""
    mbits, emin, top, overflow_nan = _ROUND_FMT[f]
    with np.errstate(all="ignore"):
        _, e = np.frexp(x)
        ulp = np.ldexp(1.0, np.maximum(e - 1, emin) - mbits)
        r = np.rint(x / ulp) * ulp
        r = np.where(np.isfinite(x) & (x != 0), r, x)
        big = np.abs(r) > top
        if big.any():
            r[big] = np.nan if overflow_nan else np.copysign(np.inf, x[big])
    return r


def _round_check(s: DeltaStats, xa: np.ndarray, xb: np.ndarray) -> None:
    """Drop from ``s.round_mask`` each format of which some new value is not old's rounding."""
    for f in range(len(_ROUND_FMT)):
        if not s.round_mask & (1 << f):
            continue
        for lo, hi in ((0, _ROUND_PROBE), (_ROUND_PROBE, xa.size)):
            if lo >= xa.size:
                break
            with np.errstate(all="ignore"):
                a, b = xa[lo:hi].astype(np.float64), xb[lo:hi].astype(np.float64)
                r = _round_to(f, a)
                ok = bool(np.all((b == r) | (np.isnan(b) & np.isnan(r))))
            if not ok:
                s.round_mask &= ~(1 << f)
                break


def _rows(s: DeltaStats, neq: np.ndarray, start: int) -> None:
    """Count the rows holding a changed element of this block (``start``: its first element's index)."""
    rows = (np.flatnonzero(neq) + start) // s.row_len
    rows = rows[np.concatenate(([True], rows[1:] != rows[:-1]))]
    if rows.size and rows[0] == s._last_row:
        rows = rows[1:]
    if rows.size:
        s.changed_rows += int(rows.size)
        s._last_row = int(rows[-1])
        want = FIRST_ROWS - len(s.first_rows)
        if want > 0:
            s.first_rows.extend(int(r) for r in rows[:want])


def _old_only(s: DeltaStats, xa: np.ndarray) -> None:
    a, _ = _buffers(s, xa.size)
    with np.errstate(all="ignore"):
        a[...] = xa
        if _optimistic(s):
            ssq = _sumsq(a)
            if math.isfinite(ssq):
                s.finite_both += a.size
                s.old_norm._merge(1.0, ssq)
                return
        n = a.size
        if s.dtype.is_float:
            fin = np.isfinite(a)
            n = int(np.count_nonzero(fin))
            if n != a.size:
                a[~fin] = 0.0
        s.finite_both += n
        _norm_add(s.old_norm, a, _careful(s))


def _changed_block(s: DeltaStats, neq: np.ndarray, changed: int, xa: np.ndarray, xb: np.ndarray) -> None:
    s.changed_elements += changed
    if _optimistic(s) and _changed_block_finite(s, changed, xa, xb):
        return
    a, d = _buffers(s, xa.size)
    with np.errstate(all="ignore"):
        a[...] = xa
        d[...] = xb  # becomes |new - old| in place
        nonfinite_moves = 0
        both: np.ndarray | None = None
        n = a.size
        if s.dtype.is_float:
            both = np.isfinite(a)
            both &= np.isfinite(d)
            n = int(np.count_nonzero(both))
            if n != a.size:
                na, nb = np.isnan(a), np.isnan(d)
                # At unchanged positions old and new agree, so these count only real news.
                s.nan_new += int(np.count_nonzero(nb & ~na))
                s.inf_new += int(np.count_nonzero(np.isinf(d) & ~np.isinf(a)))
                nonfinite_moves = int(np.count_nonzero(neq & ~both & ~(na & nb)))
                # Both rel_l2 terms cover the same positions: finite on both sides.
                a[~both] = 0.0
                d[~both] = 0.0
            else:
                both = None
        s.finite_both += n
        _norm_add(s.old_norm, a, _careful(s))
        np.subtract(d, a, out=d)
        s.sum_old_delta += float(np.dot(a, d)) if _DOT_OK else float(np.einsum("i,i->", a, d))
        np.abs(d, out=d)
        s.max_abs_delta = max(s.max_abs_delta, float(d.max()))
        s.sum_abs_delta += float(d.sum())
        _norm_add(s.delta_norm, d, _careful(s))
        if s.atol == 0.0 and s.rtol == 0.0:
            # Zero tolerance is the bitwise contract: every changed bit counts.
            s.out_of_tolerance += changed
        else:
            beyond = d > s.atol + s.rtol * np.abs(a)
            if both is not None:
                beyond &= both
            s.out_of_tolerance += int(np.count_nonzero(beyond)) + nonfinite_moves


def _changed_block_finite(s: DeltaStats, changed: int, xa: np.ndarray, xb: np.ndarray) -> bool:
    """The common block: every value finite on both sides. Same float64 arithmetic as
    the general path (so the same numbers), without its masks. Returns False, having
    recorded nothing, when a sum shows a NaN/Inf somewhere; the caller then measures
    the block the careful way."""
    a, d = _buffers(s, xa.size)
    with np.errstate(all="ignore"):
        a[...] = xa
        d[...] = xb
        ssq_old = _sumsq(a)
        np.subtract(d, a, out=d)
        sum_od = float(np.dot(a, d)) if _DOT_OK else float(np.einsum("i,i->", a, d))
        np.abs(d, out=d)
        total = float(d.sum())
        if not (math.isfinite(ssq_old) and math.isfinite(total)):
            return False
        s.finite_both += a.size
        s.old_norm._merge(1.0, ssq_old)
        s.sum_old_delta += sum_od
        s.max_abs_delta = max(s.max_abs_delta, float(d.max()))
        s.sum_abs_delta += total
        s.delta_norm._merge(1.0, _sumsq(d))
        if s.atol == 0.0 and s.rtol == 0.0:
            s.out_of_tolerance += changed
        else:
            np.abs(a, out=a)
            s.out_of_tolerance += int(np.count_nonzero(d > s.atol + s.rtol * a))
    return True
