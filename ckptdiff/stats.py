"""Statistics of a changed tensor: max/mean |new - old|, relative L2, NaN/Inf, in float64.

Two implementations give the same numbers (to float64 rounding):

* ``ckptdiff._cstats``, a small C module built at install time: one pass
  over the raw bytes, no numpy. Importing numpy costs ~50 ms, a fifth of a
  whole 1 GB diff, so the common diff never loads it;
* :mod:`ckptdiff.stats_numpy`, the fallback when the C module is missing
  (no compiler at install time) or ``CKPTDIFF_STATS=numpy`` is set.

Beside the statistics, the same pass keeps the sums :mod:`ckptdiff.cause`
reads to say *why* a tensor moved (``Σ old·Δ`` for the fit of Δ against
old, which narrower formats every new value is a rounding of, which rows
changed); they cost nothing measurable on an ordinary update (see
``_cstats.c``).

NaN/Inf convention (README, "What the numbers mean"): ``max_abs_delta``,
``mean_abs_delta`` and ``rel_l2`` are computed over the positions that are
finite on *both* sides; ``nan_new``/``inf_new`` count positions that became
NaN/Inf; ``changed_elements`` counts every bitwise-different element.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from .stats_types import FIRST_ROWS, _Norm

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from .dtypes import DType


def _load_c() -> ModuleType | None:
    if os.environ.get("CKPTDIFF_STATS", "").strip().lower() == "numpy" or sys.byteorder != "little":
        return None  # the C module reads raw little-endian elements as native ones
    try:
        from . import _cstats
    except ImportError:
        return None
    return _cstats


_C = _load_c()
_C_KIND: dict[str, int] = {name: i for i, name in enumerate(_C.KINDS)} if _C is not None else {}

#: Which of ROUND_NAMES are narrower than each dtype (the others would say nothing).
_ROUND_CANDIDATES = {
    "float64": 0b11111,
    "float32": 0b11110,
    "float16": 0b11000,
    "bfloat16": 0b11000,
}


def _configure_causes() -> bool:
    """Hand ckptdiff.cause's thresholds to the C classifier (measure_row); False where there is none."""
    if _C is None or not hasattr(_C, "measure_row"):  # no C module, or one built before measure_row
        return False
    from . import cause

    _C.configure_causes(cause.FIT_COSINE, cause.DECAY_MAX_C, cause.MIN_ELEMENTS, cause.UNIFORM_MIN,
                        cause.STEP_MAX_COSINE, cause.STEP_MIN_CHANGED, cause.DECAY_COMPONENT_COSINE,
                        cause.SPARSE_MAX_FRACTION, cause.SPARSE_MIN_ROWS, cause.REINIT_MAX_COSINE,
                        cause.REINIT_MIN_REL_L2, tuple(cause.RUNNING_STAT_NAMES))
    return True


_C_ROWS = _configure_causes()


def measured_row(dtype: DType, ca: memoryview, cb: memoryview, atol: float, rtol: float, numel: int, rows: int,
                 row_len: int, name: str) -> tuple | None:  # type: ignore[type-arg]
    """A changed tensor, both sides whole in memory, measured and classified in one C call.

    ``numel`` elements; ``rows`` and ``row_len``: its first dimension and the
    elements of a row for a tensor of two dimensions or more, -1 and 0 for
    others (``compare.measured_row`` works them out from the shape).
    ``(changed_elements, out_of_tolerance, nan_new, inf_new, max_abs_delta,
    mean_abs_delta, rel_l2, cause, cause_detail)``: exactly what
    ``DeltaStats.of_pair`` then ``cause.classify(cause.sums_of(...))`` give
    (tested against them), for ~1 us rather than ~9 us of Python a tensor; the
    rows of a run of small changed tensors are most of a many-tensor diff's
    Python. None when the C module does not handle it (no C module, a dtype
    it does not decode, a name that is not valid UTF-8, 2**53 elements or
    more): the caller then takes the Python path.
    """
    kind = _C_KIND.get(dtype.name) if _C_ROWS else None
    if kind is None:
        return None
    assert _C is not None
    return _C.measure_row(kind, ca, cb, atol, rtol, row_len, _ROUND_CANDIDATES.get(dtype.name, 0), dtype.is_float,
                          numel, rows, name, FIRST_ROWS)


def backend() -> str:
    """``"c"`` when the C module measures changed tensors, ``"numpy"`` otherwise."""
    return "c" if _C is not None else "numpy"


class DeltaStats:
    """Running statistics of ``new - old`` for one changed tensor, in float64.

    Fed chunk by chunk: :meth:`add_changed` for a chunk pair whose bytes
    differ somewhere, :meth:`add_identical` for a chunk of the same tensor
    whose bytes did not (it only adds to ``||old||``).

    ``row_len`` (elements per row: the product of the shape after its
    first dimension; 0 for tensors of fewer than two dimensions) turns on
    the count of changed rows. The cause sums: ``sum_old_delta`` (Σ old·Δ
    over positions finite on both sides), ``round_mask`` (bits of
    :data:`ROUND_NAMES`: every new value is old rounded to that format),
    ``changed_rows`` and ``first_rows`` (the first :data:`FIRST_ROWS`
    changed row indices).
    """

    __slots__ = ("dtype", "atol", "rtol", "changed_elements", "out_of_tolerance", "finite_both",
                 "max_abs_delta", "sum_abs_delta", "nan_new", "inf_new", "delta_norm", "old_norm",
                 "sum_old_delta", "round_mask", "row_len", "changed_rows", "first_rows", "_last_row",
                 "_kind", "_bufs")

    def __init__(self, dtype: DType, atol: float = 0.0, rtol: float = 0.0, row_len: int = 0) -> None:
        self.dtype = dtype
        self.atol, self.rtol = atol, rtol
        self.changed_elements = 0
        self.out_of_tolerance = 0
        self.finite_both = 0
        self.max_abs_delta = 0.0
        self.sum_abs_delta = 0.0
        self.nan_new = 0
        self.inf_new = 0
        self.delta_norm = _Norm()
        self.old_norm = _Norm()
        self.sum_old_delta = 0.0
        self.round_mask = _ROUND_CANDIDATES.get(dtype.name, 0)
        self.row_len = row_len
        self.changed_rows = 0
        self.first_rows: list[int] = []
        self._last_row = -1
        self._kind = _C_KIND.get(dtype.name)  # None: measured with numpy
        self._bufs = None  # stats_numpy's float64 blocks

    @classmethod
    def of_pair(cls, dtype: DType, ca: memoryview, cb: memoryview, atol: float = 0.0, rtol: float = 0.0,
                row_len: int = 0) -> DeltaStats:
        """The statistics of a changed tensor whose two sides are whole in memory: what
        ``DeltaStats(dtype, atol, rtol, row_len)`` then ``add_changed(ca, cb)`` gives, with one
        measuring call and none of the running bookkeeping (a run of small tensors makes many)."""
        kind = _C_KIND.get(dtype.name)
        if kind is None:
            s = cls(dtype, atol, rtol, row_len)
            s.add_changed(ca, cb)
            return s
        assert _C is not None
        (changed, out, finite, mx, total, nan_new, inf_new, d_scale, d_ssq, o_scale, o_ssq, sum_od, mask, rows,
         last_row, first) = _C.measure(kind, ca, cb, atol, rtol, row_len, 0, -1, FIRST_ROWS,
                                       _ROUND_CANDIDATES.get(dtype.name, 0))
        s = cls.__new__(cls)
        s.dtype, s.atol, s.rtol, s.row_len, s._kind, s._bufs = dtype, atol, rtol, row_len, kind, None
        s.changed_elements, s.out_of_tolerance, s.finite_both = changed, out, finite
        s.max_abs_delta = mx if mx > 0.0 else 0.0
        s.sum_abs_delta = 0.0 + total
        s.nan_new, s.inf_new = nan_new, inf_new
        s.delta_norm, s.old_norm = _Norm(), _Norm()
        s.delta_norm._merge(d_scale, d_ssq)
        s.old_norm._merge(o_scale, o_ssq)
        s.sum_old_delta = 0.0 + sum_od
        s.round_mask = mask
        s.changed_rows = rows
        s._last_row = last_row if rows else -1
        s.first_rows = list(first) if rows else []
        return s

    def add_changed(self, ca: memoryview, cb: memoryview, offset: int = 0) -> None:
        """A chunk pair whose bytes differ somewhere; ``offset``: its first byte's place in the tensor.

        Changed chunks must come in tensor order (rows are counted as they pass).
        """
        if self._kind is None:
            from . import stats_numpy  # numpy loads here, at the first changed tensor

            stats_numpy.add_changed(self, ca, cb, offset // self.dtype.itemsize)
            return
        assert _C is not None
        self._take(_C.measure(self._kind, ca, cb, self.atol, self.rtol, self.row_len,
                              offset // self.dtype.itemsize, self._last_row,
                              FIRST_ROWS - len(self.first_rows), self.round_mask))

    def add_identical(self, chunk: memoryview) -> None:
        """An identical chunk of a changed tensor: it only adds to ``||old||``."""
        if self._kind is None:
            from . import stats_numpy

            stats_numpy.add_identical(self, chunk)
            return
        assert _C is not None
        self._take(_C.measure(self._kind, chunk, None, 0.0, 0.0, 0, 0, -1, 0, self.round_mask))

    def _take(self, r: tuple) -> None:  # type: ignore[type-arg]  # the C module's 16 items
        (changed, out, finite, mx, total, nan_new, inf_new, d_scale, d_ssq, o_scale, o_ssq,
         sum_od, self.round_mask, rows, last_row, first) = r
        self.sum_old_delta += sum_od
        self.changed_rows += rows
        if rows:
            self._last_row = last_row
            self.first_rows.extend(first)
        self.changed_elements += changed
        self.out_of_tolerance += out
        self.finite_both += finite
        if mx > self.max_abs_delta:
            self.max_abs_delta = mx
        self.sum_abs_delta += total
        self.nan_new += nan_new
        self.inf_new += inf_new
        self.delta_norm._merge(d_scale, d_ssq)
        self.old_norm._merge(o_scale, o_ssq)

    @property
    def mean_abs_delta(self) -> float | None:
        return self.sum_abs_delta / self.finite_both if self.finite_both else None

    @property
    def rel_l2(self) -> float | None:
        return self.delta_norm.ratio(self.old_norm) if self.finite_both else None
