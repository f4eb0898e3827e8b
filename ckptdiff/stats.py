"""Statistics of a changed tensor: max/mean |new - old|, relative L2, NaN/Inf, in float64.

Split from :mod:`ckptdiff.compare` so that numpy (and, for bf16/fp8,
ml_dtypes) load only when a tensor actually differs: comparing identical
bytes needs BLAKE3 and ``memcmp`` only, and importing numpy costs ~50 ms,
as much as diffing half a gigabyte.

NaN/Inf convention (README, "What the numbers mean"): ``max_abs_delta``,
``mean_abs_delta`` and ``rel_l2`` are computed over the positions that are
finite on *both* sides; ``nan_new``/``inf_new`` count positions that became
NaN/Inf; ``changed_elements`` counts every bitwise-different element.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np

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


def _sumsq(x: np.ndarray) -> float:
    return float(np.dot(x, x)) if _DOT_OK else float(np.einsum("i,i->", x, x))


@dataclass
class _Norm:
    """A Euclidean norm accumulated as ``scale * sqrt(ssq)``.

    float64 tensors can hold values whose squares overflow (1e200) or
    underflow (1e-200); those blocks are added scaled by their largest
    magnitude, as LAPACK's dnrm2 does. Narrower dtypes cannot overflow in
    float64 and take the plain, cheaper path (scale 1).
    """

    scale: float = 1.0
    ssq: float = 0.0

    def add(self, x: np.ndarray, careful: bool) -> None:
        if x.size == 0:
            return
        if careful:
            m = float(np.max(np.abs(x)))
            if m == 0.0:
                return
            if m == math.inf:  # a delta that overflowed float64 itself
                self._merge(math.inf, 1.0)
                return
            if not (1e-140 < m < 1e140):
                self._merge(m, _sumsq(x / m))
                return
        self._merge(1.0, _sumsq(x))

    def _merge(self, scale: float, ssq: float) -> None:
        if ssq == 0.0:
            return
        if self.ssq == 0.0:
            self.scale, self.ssq = scale, ssq
        elif scale > self.scale:
            self.ssq = self.ssq * (self.scale / scale) ** 2 + ssq
            self.scale = scale
        else:
            self.ssq += ssq * (scale / self.scale) ** 2

    @property
    def is_zero(self) -> bool:
        return self.ssq == 0.0

    def ratio(self, other: _Norm) -> float:
        """``self / other`` without overflowing on the way."""
        if other.is_zero:
            return 0.0 if self.is_zero else math.inf
        if self.is_zero:
            return 0.0
        return (self.scale / other.scale) * math.sqrt(self.ssq / other.ssq)


#: Elements per statistics block: two float64 buffers of this size (2 MiB)
#: stay in cache through the ~10 passes a block needs, and are reused, so no
#: chunk-sized temporaries are allocated (and page-faulted) per chunk.
STATS_BLOCK = 1 << 17


def _stats_buffers() -> tuple[np.ndarray, np.ndarray]:
    """This thread's float64 statistics blocks (see STATS_BLOCK), allocated once, not per tensor."""
    bufs = getattr(_LOCAL, "stats", None)
    if bufs is None or bufs[0].size != STATS_BLOCK:
        bufs = _LOCAL.stats = (np.empty(STATS_BLOCK, np.float64), np.empty(STATS_BLOCK, np.float64))
    return bufs


@dataclass
class DeltaStats:
    """Running statistics of ``new - old`` for one changed tensor, in float64."""

    dtype: np.dtype
    is_float: bool
    atol: float = 0.0
    rtol: float = 0.0
    changed_elements: int = 0
    out_of_tolerance: int = 0
    finite_both: int = 0
    max_abs_delta: float = 0.0
    sum_abs_delta: float = 0.0
    nan_new: int = 0
    inf_new: int = 0
    delta_norm: _Norm = field(default_factory=_Norm)
    old_norm: _Norm = field(default_factory=_Norm)
    _bufs: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def _careful(self) -> bool:
        return self.dtype.itemsize == 8 and self.is_float

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._bufs is None or self._bufs[0].size < n:
            self._bufs = _stats_buffers()
        return self._bufs[0][:n], self._bufs[1][:n]

    def add_identical(self, chunk: memoryview) -> None:
        """An identical chunk of a changed tensor: it only adds to ``||old||``."""
        x = np.frombuffer(chunk, dtype=self.dtype)
        for s in range(0, x.size, STATS_BLOCK):
            self._old_only(x[s:s + STATS_BLOCK])

    @property
    def _optimistic(self) -> bool:
        """Narrow floats: measure first, look for NaN/Inf only if a sum came out non-finite.

        Squares and sums of float32/16/bf16/fp8 values cannot overflow float64,
        so the three block sums are finite exactly when every input is; the
        finiteness masks (four more passes) are then only built for the rare
        block that needs them. float64 can overflow and ints have no NaN, so
        they keep the plain paths.
        """
        return self.is_float and self.dtype.itemsize < 8

    def _old_only(self, xa: np.ndarray) -> None:
        a, _ = self._buffers(xa.size)
        with np.errstate(all="ignore"):
            a[...] = xa
            if self._optimistic:
                ssq = _sumsq(a)
                if math.isfinite(ssq):
                    self.finite_both += a.size
                    self.old_norm._merge(1.0, ssq)
                    return
            n = a.size
            if self.is_float:
                fin = np.isfinite(a)
                n = int(np.count_nonzero(fin))
                if n != a.size:
                    a[~fin] = 0.0
            self.finite_both += n
            self.old_norm.add(a, self._careful)

    def add_changed(self, ca: memoryview, cb: memoryview) -> None:
        """A chunk pair whose bytes differ somewhere, measured block by block.

        Unchanged positions inside a changed block contribute a delta of
        exactly 0, so whole blocks are measured (a fine-tune usually changes
        every element); blocks without a differing bit only add to ``||old||``.
        """
        u = _UINT_OF_SIZE[self.dtype.itemsize]
        ua, ub = np.frombuffer(ca, dtype=u), np.frombuffer(cb, dtype=u)
        xa, xb = np.frombuffer(ca, dtype=self.dtype), np.frombuffer(cb, dtype=self.dtype)
        for s in range(0, xa.size, STATS_BLOCK):
            e = s + STATS_BLOCK
            neq = ua[s:e] != ub[s:e]
            changed = int(np.count_nonzero(neq))
            if changed:
                self._changed_block(neq, changed, xa[s:e], xb[s:e])
            else:
                self._old_only(xa[s:e])

    def _changed_block(self, neq: np.ndarray, changed: int, xa: np.ndarray, xb: np.ndarray) -> None:
        self.changed_elements += changed
        if self._optimistic and self._changed_block_finite(changed, xa, xb):
            return
        a, d = self._buffers(xa.size)
        with np.errstate(all="ignore"):
            a[...] = xa
            d[...] = xb  # becomes |new - old| in place
            nonfinite_moves = 0
            both: np.ndarray | None = None
            n = a.size
            if self.is_float:
                both = np.isfinite(a)
                both &= np.isfinite(d)
                n = int(np.count_nonzero(both))
                if n != a.size:
                    na, nb = np.isnan(a), np.isnan(d)
                    # At unchanged positions old and new agree, so these count only real news.
                    self.nan_new += int(np.count_nonzero(nb & ~na))
                    self.inf_new += int(np.count_nonzero(np.isinf(d) & ~np.isinf(a)))
                    nonfinite_moves = int(np.count_nonzero(neq & ~both & ~(na & nb)))
                    # Both rel_l2 terms cover the same positions: finite on both sides.
                    a[~both] = 0.0
                    d[~both] = 0.0
                else:
                    both = None
            self.finite_both += n
            self.old_norm.add(a, self._careful)
            np.subtract(d, a, out=d)
            np.abs(d, out=d)
            self.max_abs_delta = max(self.max_abs_delta, float(d.max()))
            self.sum_abs_delta += float(d.sum())
            self.delta_norm.add(d, self._careful)
            if self.atol == 0.0 and self.rtol == 0.0:
                # Zero tolerance is the bitwise contract: every changed bit counts.
                self.out_of_tolerance += changed
            else:
                beyond = d > self.atol + self.rtol * np.abs(a)
                if both is not None:
                    beyond &= both
                self.out_of_tolerance += int(np.count_nonzero(beyond)) + nonfinite_moves

    def _changed_block_finite(self, changed: int, xa: np.ndarray, xb: np.ndarray) -> bool:
        """The common block: every value finite on both sides. Same float64 arithmetic as
        the general path (so the same numbers), without its masks. Returns False, having
        recorded nothing, when a sum shows a NaN/Inf somewhere; the caller then measures
        the block the careful way."""
        a, d = self._buffers(xa.size)
        with np.errstate(all="ignore"):
            a[...] = xa
            d[...] = xb
            ssq_old = _sumsq(a)
            np.subtract(d, a, out=d)
            np.abs(d, out=d)
            total = float(d.sum())
            if not (math.isfinite(ssq_old) and math.isfinite(total)):
                return False
            self.finite_both += a.size
            self.old_norm._merge(1.0, ssq_old)
            self.max_abs_delta = max(self.max_abs_delta, float(d.max()))
            self.sum_abs_delta += total
            self.delta_norm._merge(1.0, _sumsq(d))
            if self.atol == 0.0 and self.rtol == 0.0:
                self.out_of_tolerance += changed
            else:
                np.abs(a, out=a)
                self.out_of_tolerance += int(np.count_nonzero(d > self.atol + self.rtol * a))
        return True

    @property
    def mean_abs_delta(self) -> float | None:
        return self.sum_abs_delta / self.finite_both if self.finite_both else None

    @property
    def rel_l2(self) -> float | None:
        return self.delta_norm.ratio(self.old_norm) if self.finite_both else None
