"""The running sums of :class:`ckptdiff.stats.DeltaStats`, as both implementations see them.

:mod:`ckptdiff.stats` (which picks the C module or numpy) imports
:mod:`ckptdiff.stats_numpy` lazily, and the numpy code fills the same sums:
the shapes they share live here, so neither imports the other back.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # DeltaSums only describes DeltaStats to type checkers


class _Norm:
    """A Euclidean norm accumulated as ``scale * sqrt(ssq)``.

    float64 tensors can hold values whose squares overflow (1e200) or
    underflow (1e-200); those blocks are added scaled by their largest
    magnitude, as LAPACK's dnrm2 does. Narrower dtypes cannot overflow in
    float64 and take the plain, cheaper path (scale 1).
    """

    __slots__ = ("scale", "ssq")

    def __init__(self) -> None:
        self.scale = 1.0
        self.ssq = 0.0

    def _merge(self, scale: float, ssq: float) -> None:
        if ssq == 0.0:
            return
        if self.ssq == 0.0:
            self.scale, self.ssq = scale, ssq
        elif scale > self.scale:
            self.ssq = self.ssq * (self.scale / scale) ** 2 + ssq
            self.scale = scale
        elif scale == self.scale:  # also inf == inf, where the ratio would be NaN
            self.ssq += ssq
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


#: Narrower formats a changed tensor may be a rounding of, as bits of ``DeltaStats.round_mask``
#: (the C module's ROUND_NAMES, in the same order; the cause ``precision_roundtrip``).
ROUND_NAMES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: How many changed rows are listed by index (the rest are only counted).
FIRST_ROWS = 8


class DeltaSums(Protocol):
    """What :mod:`ckptdiff.stats_numpy` reads and adds to (a :class:`~ckptdiff.stats.DeltaStats`)."""

    dtype: Any
    atol: float
    rtol: float
    changed_elements: int
    out_of_tolerance: int
    finite_both: int
    max_abs_delta: float
    sum_abs_delta: float
    nan_new: int
    inf_new: int
    delta_norm: _Norm
    old_norm: _Norm
    sum_old_delta: float
    round_mask: int
    row_len: int
    changed_rows: int
    first_rows: list[int]
    _last_row: int
    _bufs: Any


__all__ = ["DeltaSums", "_Norm", "ROUND_NAMES", "FIRST_ROWS"]
