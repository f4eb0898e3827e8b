"""Does one merged tensor equal BASE + scaling · B @ A? In bounded memory, with an honest tolerance.

The expected value is computed in float64, a block of rows at a time
(never the whole delta of a big module at once), and compared with MERGED
element by element against a tolerance derived from MERGED's dtype.

The tolerance is the rounding error a correct merge can make, doubled. A
merger (PEFT on CPU casts half-precision factors to float32; a GPU matmul
accumulates in float32) computes the r-term dot product ``sum_k B_ik A_kj``
in a precision ``u_acc`` at least float32's or the weights' own, whichever
is finer, then scales, rounds to the weight dtype and adds. With ``u`` the
unit roundoff of MERGED's dtype (half its machine epsilon), ``exact`` the
float64 expected value and ``mag = |scaling| · sum_k |B_ik| |A_kj|``:

* dot product and scaling, in any summation order, FMA or not:
  ``(r + 1) · u_acc · mag``;
* rounding the delta to the weight dtype (and scaling there, as a GPU merge
  in bf16 does): ``2 · u · mag``;
* the final addition, rounded: ``u · |exact|``;
* the verifier's own float64 arithmetic: ``(r + 2) · 2^-53 · (|exact| + mag)``;
* plus the dtype's smallest normal number, for results flushed to zero.

``tolerance = 2 · (u·|exact| + 2·u·mag + (r+1)·u_acc·mag) + (r+2)·2^-53·(|exact| + mag) + tiny``

A merge that used TF32 matmuls, or accumulated in half precision, is
reported as off: its error is beyond what a float32 merge can make.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import dtypes
from ..checkpoint import TensorRef
from ..compare import compare_pair
from ..report import MergeCheck

if TYPE_CHECKING:
    import numpy as np

#: Elements of MERGED compared per block: a handful of float64 temporaries of
#: this many elements (~8 MiB each) is the whole memory cost of a module.
BLOCK_ELEMENTS = 1 << 20
_U64 = 2.0 ** -53
_U32 = 2.0 ** -24


def precision(dtype: str) -> tuple[float, float]:
    """(unit roundoff, smallest normal) of a floating dtype from the table."""
    import ml_dtypes

    info = ml_dtypes.finfo(dtypes.get(dtype).np_dtype)
    return float(info.eps) / 2, float(info.tiny)


def check_delta(base: TensorRef, merged: TensorRef, left: np.ndarray, right: np.ndarray, *, rank: int,
                scaling: float, kind: str, adapter_key: str) -> MergeCheck:
    """MERGED against ``BASE + scaling * left @ right``, ``left``/``right`` float64 (R x r, r x C), R*C = numel.

    BASE and MERGED are read as R rows of C elements (C order), a block of
    rows at a time; shapes and dtypes must already be checked (same numel,
    floating dtypes).
    """
    import numpy as np

    rows, cols = left.shape[0], right.shape[1]
    if rows * cols == 0:
        return MergeCheck("merge-exact", kind, adapter_key, rank, scaling, 0.0, 0.0, 0)
    u, tiny = precision(merged.dtype)
    u_acc = min(u, _U32)
    per_block = max(1, BLOCK_ELEMENTS // cols)
    abs_left, abs_right = np.abs(left), np.abs(right)
    worst = max_error = 0.0
    off = 0
    start = 0
    blocks = zip(base.chunks(per_block * cols * base.itemsize), merged.chunks(per_block * cols * merged.itemsize))
    for cb, cm in blocks:
        n = cb.nbytes // base.itemsize // cols
        b = np.frombuffer(cb, dtype=base.dtype_info.np_dtype).astype(np.float64).reshape(n, cols)
        m = np.frombuffer(cm, dtype=merged.dtype_info.np_dtype).astype(np.float64).reshape(n, cols)
        exact = b + scaling * (left[start:start + n] @ right)
        mag = abs(scaling) * (abs_left[start:start + n] @ abs_right)
        abs_exact = np.abs(exact)
        tol = 2 * (u * abs_exact + (2 * u + (rank + 1) * u_acc) * mag) + (rank + 2) * _U64 * (abs_exact + mag) + tiny
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.abs(m - exact)
            # inf == inf is exact; NaN where a NaN is expected is no error either.
            err[(m == exact) | (np.isnan(m) & np.isnan(exact))] = 0.0
            ratio = err / tol
        bad = ~(ratio <= 1.0)  # NaN counts as off
        off += int(np.count_nonzero(bad))
        if err.size:
            max_error = _nan_max(max_error, float(np.max(err)))
            worst = _nan_max(worst, float(np.max(ratio)))
        start += n
    if start != rows:
        raise AssertionError(f"read {start} of {rows} rows of {merged.name!r}")  # chunks cover the tensor exactly
    return MergeCheck("merge-exact" if off == 0 else "merge-off", kind, adapter_key, rank, scaling,
                      max_error=max_error, tolerance_ratio=worst, elements_off=off)


def _nan_max(a: float, b: float) -> float:
    """``max`` that keeps a NaN (a NaN where a number was expected is reported as nan, not hidden)."""
    return a if a != a else b if b != b or b > a else a


def check_copy(copy: TensorRef, merged: TensorRef, adapter_key: str) -> MergeCheck:
    """A ``modules_to_save`` tensor: MERGED must hold the adapter's copy, bit for bit."""
    if copy.shape != merged.shape or copy.dtype != merged.dtype:
        return MergeCheck("merge-off", "copy", adapter_key,
                          note=f"MERGED is {merged.dtype}{list(merged.shape)}, the adapter's copy "
                               f"{copy.dtype}{list(copy.shape)}")
    res = compare_pair(copy, merged)
    if res.stats is None:
        return MergeCheck("merge-exact", "copy", adapter_key, max_error=0.0, tolerance_ratio=0.0, elements_off=0)
    return MergeCheck("merge-off", "copy", adapter_key, max_error=res.stats.max_abs_delta, tolerance_ratio=None,
                      elements_off=res.stats.changed_elements)


__all__ = ["BLOCK_ELEMENTS", "check_copy", "check_delta", "precision"]
