"""The numerical rank of a delta matrix, for the ``low_rank`` cause (``--rank``).

A merged LoRA adapter changes a weight by ``B @ A``: a delta of rank r (plus
the rounding of the sum). Rank needs the whole matrix, unlike every other
cause, so this is opt-in and reads each candidate tensor pair once more.
A randomized range finder (Halko, Martinsson & Tropp 2011) with a couple of
power iterations gives the top singular values for the price of a few
matrix products; ``||Δ||_F²`` is known exactly, so the energy captured by the
top r values needs no full SVD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .cause import LOW_RANK_ENERGY, LOW_RANK_OVERRIDES, with_low_rank

if TYPE_CHECKING:
    import numpy as np

    from .checkpoint import TensorRef
    from .report import TensorDiff

#: Extra directions beyond the largest rank asked about, and power iterations: the textbook values.
OVERSAMPLE = 8
POWER_ITERATIONS = 2


def numerical_rank(delta: np.ndarray, max_rank: int, energy: float = LOW_RANK_ENERGY) -> tuple[int | None, float]:
    """``(r, captured)``: the smallest r <= max_rank whose top singular values hold ``energy``
    of ``||delta||_F²`` (None when none does), and the share r (or max_rank) captures.

    A matrix whose smaller side is under twice ``max_rank`` is never called
    low-rank: every such matrix has a small rank.
    """
    import numpy as np

    m, n = delta.shape
    total = float(np.einsum("ij,ij->", delta, delta))
    if total == 0.0 or min(m, n) < 2 * max_rank:
        return None, 0.0
    k = min(max_rank + OVERSAMPLE, min(m, n))
    rng = np.random.default_rng(0)  # a fixed start: the same answer every run
    y = delta @ rng.standard_normal((n, k))
    q, _ = np.linalg.qr(y)
    for _ in range(POWER_ITERATIONS):
        q, _ = np.linalg.qr(delta.T @ q)
        q, _ = np.linalg.qr(delta @ q)
    sv = np.linalg.svd(q.T @ delta, compute_uv=False)
    captured = np.cumsum(sv ** 2) / total
    for r in range(1, min(max_rank, k) + 1):
        if captured[r - 1] >= energy:
            return r, float(captured[r - 1])
    return None, float(captured[min(max_rank, k) - 1])


def _matrix(ref: TensorRef) -> np.ndarray:
    import numpy as np

    a = ref.numpy().astype(np.float64)
    return a.reshape(ref.shape[0], -1)


def apply_low_rank(tensors: list[TensorDiff], old: Mapping[str, TensorRef], new: Mapping[str, TensorRef],
                   max_rank: int) -> None:
    """Give ``low_rank`` to each changed float matrix whose delta has rank <= max_rank.

    Only tensors the streaming pass left as ``optimizer_step`` or
    ``dense_update`` are read (every other cause is more specific).
    """
    for td in tensors:
        if (td.status != "changed" or td.cause not in LOW_RANK_OVERRIDES or td.shape_old is None
                or len(td.shape_old) < 2 or td.name not in old or not old[td.name].dtype_info.is_float):
            continue
        delta = _matrix(new[td.name]) - _matrix(old[td.name])
        r, captured = numerical_rank(delta, max_rank)
        assert td.cause is not None and td.cause_detail is not None
        td.cause, td.cause_detail = with_low_rank(td.cause, td.cause_detail, r, captured, max_rank)
