"""Why a tensor moved: the shape of its delta, named from sums of one streaming pass.

The engine measures a changed tensor once (:mod:`ckptdiff.stats`) and keeps,
beside the statistics, a few running sums: ``Σ old·Δ``, ``Σ old²``,
``Σ Δ²``, ``Σ |Δ|``, which narrower formats every new value is a rounding
of, and which rows changed. Those sums are enough to tell the usual reasons a
tensor moves apart, because each leaves its own fingerprint:

* decoupled weight decay makes ``Δ = −c·old``: the cosine of Δ with −old is 1;
* Adam stepping on stale momentum moves every element by about the learning
  rate whatever its value: ``|Δ|`` is nearly uniform, so
  ``(Σ|Δ|)² / (n·ΣΔ²)`` (1 for equal magnitudes, 2/π for a Gaussian) is near 1;
* a round trip through bf16/fp16/fp8 leaves every new value exactly the old
  one rounded to nearest even;
* new-token embeddings or a few retrained classes change a few rows only;
* a re-initialised tensor is uncorrelated with the old one;
* a merged LoRA leaves a delta of small numerical rank (needs the whole
  matrix, so only on request: :mod:`ckptdiff.lowrank`).

This module is the pure part: sums in, ``(cause, cause_detail)`` out, by the
thresholds below (documented in docs/causes.md). Nothing here reads a file.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

from .stats_types import ROUND_NAMES

#: The vocabulary, in the order the classifier tries the causes.
CAUSES = ("nan_inf", "running_stats", "precision_roundtrip", "weight_decay", "rescaled", "sparse_rows",
          "reinitialized", "low_rank", "optimizer_step", "dense_update")

#: |cos(Δ, old)| at least this: Δ is a multiple of old (weight_decay for −c, rescaled for +c).
FIT_COSINE = 0.99
#: Decay never takes more than this fraction of a tensor away (c = 1 zeroes it: reinitialized).
DECAY_MAX_C = 0.5
#: Fewer elements than this say nothing statistical (a cosine of 3 numbers is near ±1 by chance).
MIN_ELEMENTS = 8
#: optimizer_step: (Σ|Δ|)² / (n·ΣΔ²) over the changed elements at least this (1: equal magnitudes;
#: 2/π ≈ 0.64 for Gaussian deltas, 0.75 for uniformly spread ones) ...
UNIFORM_MIN = 0.9
#: ... and |cos(Δ, old)| at most this (the step does not follow the value) ...
STEP_MAX_COSINE = 0.5
#: ... and at least this fraction of the elements changed (a step moves every element).
STEP_MIN_CHANGED = 0.9
#: A decay component is reported beside an optimizer step when |cos(Δ, old)| is at least this.
DECAY_COMPONENT_COSINE = 0.05
#: sparse_rows: at most this fraction of the rows changed, of a tensor with at least SPARSE_MIN_ROWS rows.
SPARSE_MAX_FRACTION = 0.25
SPARSE_MIN_ROWS = 4
#: reinitialized: |cos(new, old)| at most this and ||Δ|| / ||old|| at least REINIT_MIN_REL_L2
#: (or new all zeros).
REINIT_MAX_COSINE = 0.2
REINIT_MIN_REL_L2 = 0.5
#: low_rank: the top ``r`` singular values (r <= --rank) hold at least this share of ||Δ||².
LOW_RANK_ENERGY = 0.99

#: Normalisation statistics buffers, by the last part of the name (PyTorch, Keras, Flax spellings).
RUNNING_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked", "moving_mean", "moving_variance",
                      "moving_var", "running_std", "batch_stats")


class Sums:
    """What the streaming pass knows about one changed tensor (all over the whole tensor).

    Norms are plain floats (``||x|| = sqrt(Σ x²)``); ``round_formats`` lists the
    narrower formats every new value is old's rounding to; ``rows`` is the first
    dimension's length for tensors of two dimensions or more, else None.

    A plain class with a dataclass's constructor, ``repr`` and ``==``: the
    ``dataclasses`` module (with ``inspect``) is a tenth of a small diff's start-up.
    """

    _FIELDS = ("name", "is_float", "numel", "changed", "nan_new", "inf_new", "sum_abs_delta", "max_abs_delta",
               "delta_norm", "old_norm", "sum_old_delta", "round_formats", "rows", "changed_rows", "first_rows")

    def __init__(self, name: str, is_float: bool, numel: int, changed: int, nan_new: int = 0, inf_new: int = 0,
                 sum_abs_delta: float = 0.0, max_abs_delta: float = 0.0, delta_norm: float = 0.0,
                 old_norm: float = 0.0, sum_old_delta: float = 0.0, round_formats: list[str] | None = None,
                 rows: int | None = None, changed_rows: int = 0, first_rows: list[int] | None = None) -> None:
        self.name = name
        self.is_float = is_float
        self.numel = numel
        self.changed = changed
        self.nan_new = nan_new
        self.inf_new = inf_new
        self.sum_abs_delta = sum_abs_delta
        self.max_abs_delta = max_abs_delta
        self.delta_norm = delta_norm
        self.old_norm = old_norm
        self.sum_old_delta = sum_old_delta
        self.round_formats: list[str] = [] if round_formats is None else round_formats
        self.rows = rows
        self.changed_rows = changed_rows
        self.first_rows: list[int] = [] if first_rows is None else first_rows

    def __repr__(self) -> str:
        return f"Sums({', '.join(f'{k}={getattr(self, k)!r}' for k in self._FIELDS)})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq


def sums_of(name: str, shape: list[int] | tuple[int, ...], stats: Any) -> Sums:
    """A :class:`Sums` from a :class:`ckptdiff.stats.DeltaStats` (read only)."""
    numel = 1
    for d in shape:
        numel *= d
    return Sums(
        name=name, is_float=stats.dtype.is_float, numel=numel, changed=stats.changed_elements,
        nan_new=stats.nan_new, inf_new=stats.inf_new, sum_abs_delta=stats.sum_abs_delta,
        max_abs_delta=stats.max_abs_delta,
        delta_norm=_norm(stats.delta_norm), old_norm=_norm(stats.old_norm), sum_old_delta=stats.sum_old_delta,
        round_formats=[f for i, f in enumerate(ROUND_NAMES) if mask >> i & 1] if (mask := stats.round_mask) else [],
        rows=shape[0] if len(shape) >= 2 else None, changed_rows=stats.changed_rows,
        first_rows=list(stats.first_rows),
    )


def _norm(n: Any) -> float:
    return n.scale * math.sqrt(n.ssq) if n.ssq else 0.0


def _cos(dot: float, a: float, b: float) -> float | None:
    """A cosine from a dot product and two norms; None where undefined (a zero vector, overflow)."""
    isfinite = math.isfinite
    if not (a > 0 and b > 0) or not (isfinite(dot) and isfinite(a) and isfinite(b)):
        return None
    return max(-1.0, min(1.0, dot / a / b))  # two divisions: a * b may underflow to 0


def _round(x: float | None, digits: int = 6) -> float | None:
    """Evidence numbers to a few significant digits: enough to read, stable across CPUs' last bits."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return float("%.*g" % (digits, x))


def running_stat(name: str) -> str | None:
    """The normalisation-statistics spelling a tensor name ends with, if any."""
    last = name.rsplit(".", 1)[-1].rsplit("/", 1)[-1].split(":")[0]
    return last if last in RUNNING_STAT_NAMES else None


def classify(s: Sums) -> tuple[str, dict[str, Any]]:
    """``(cause, cause_detail)`` of one changed tensor, by the module's thresholds.

    ``low_rank`` is decided afterwards, by :func:`with_low_rank`, for the
    tensors the rank test was asked for (it needs the whole matrix).
    """
    if s.nan_new or s.inf_new:
        return "nan_inf", {"nan_new": s.nan_new, "inf_new": s.inf_new}
    stat = running_stat(s.name)
    if stat is not None:
        return "running_stats", {"buffer": stat, "rel_l2": _round(_ratio(s.delta_norm, s.old_norm))}
    if s.round_formats and s.changed:
        # ROUND_NAMES runs from the most precise format down: the first that fits is the exact claim
        # (new values that are bf16 roundings are fp8 ones only by chance, and the other way round).
        return "precision_roundtrip", {"dtype": s.round_formats[0],
                                       "max_abs_delta": _round(s.max_abs_delta)}
    old2, d2 = s.old_norm, s.delta_norm
    # ||new||² = ||old||² + 2 Σ old·Δ + ||Δ||², all from the same sums.
    new_sq = old2 * old2 + 2 * s.sum_old_delta + d2 * d2
    tiny = 1e-6 * old2  # below this, ||new|| is the rounding of the sum above: new is all zeros
    new_norm = math.sqrt(new_sq) if new_sq > tiny * tiny and math.isfinite(new_sq) else 0.0
    cos_d = _cos(s.sum_old_delta, d2, old2)
    cos_new = _cos(old2 * old2 + s.sum_old_delta, new_norm, old2)
    rel = _ratio(d2, old2)
    statistical = s.is_float and s.numel >= MIN_ELEMENTS
    if statistical and cos_d is not None and abs(cos_d) >= FIT_COSINE:
        c = s.sum_old_delta / old2 / old2  # two divisions: old2 * old2 may underflow to 0
        if -DECAY_MAX_C < c < 0:
            return "weight_decay", {"c": _round(-c, 4), "cosine": _round(-cos_d), "rel_l2": _round(rel)}
        if c > 0:
            return "rescaled", {"c": _round(c, 4), "cosine": _round(cos_d), "rel_l2": _round(rel)}
    if s.rows is not None and s.rows >= SPARSE_MIN_ROWS and 0 < s.changed_rows <= SPARSE_MAX_FRACTION * s.rows:
        return "sparse_rows", {"rows": s.changed_rows, "of": s.rows, "first": list(s.first_rows)}
    if statistical and old2 > 0 and (new_norm == 0.0 or (
            cos_new is not None and abs(cos_new) <= REINIT_MAX_COSINE and rel is not None
            and rel >= REINIT_MIN_REL_L2)):
        return "reinitialized", {"cosine": _round(cos_new) if new_norm else None, "rel_l2": _round(rel),
                                 "new_norm_ratio": _round(_ratio(new_norm, old2))}
    uniformity = None
    finite_changed = s.changed - s.nan_new - s.inf_new
    if finite_changed > 0 and d2 > 0 and math.isfinite(s.sum_abs_delta) and math.isfinite(d2):
        q = s.sum_abs_delta / d2  # at most sqrt(n): no overflow on the way
        uniformity = min(1.0, q * q / finite_changed)
    typical = s.sum_abs_delta / finite_changed if finite_changed > 0 else None
    if statistical and uniformity is not None and uniformity >= UNIFORM_MIN and (
            cos_d is None or abs(cos_d) <= STEP_MAX_COSINE) and s.changed >= STEP_MIN_CHANGED * s.numel:
        detail: dict[str, Any] = {"typical_abs_delta": _round(typical), "uniformity": _round(uniformity)}
        if cos_d is not None and abs(cos_d) >= DECAY_COMPONENT_COSINE:
            detail["decay_c"] = _round(-s.sum_old_delta / old2 / old2, 4)
            detail["decay_share"] = _round(cos_d * cos_d, 4)
        return "optimizer_step", detail
    return "dense_update", {"cosine": _round(cos_d), "uniformity": _round(uniformity),
                            "typical_abs_delta": _round(typical)}


#: Causes that a low-rank delta explains better (low_rank comes before them in CAUSES).
LOW_RANK_OVERRIDES = ("optimizer_step", "dense_update")


def with_low_rank(cause: str, detail: dict[str, Any], rank: int | None, energy: float,
                  max_rank: int) -> tuple[str, dict[str, Any]]:
    """The cause once the delta's numerical rank is known (:func:`ckptdiff.lowrank.numerical_rank`).

    ``rank`` is the smallest r whose top singular values hold LOW_RANK_ENERGY
    of ||Δ||², None when no r <= ``max_rank`` does.
    """
    if cause in LOW_RANK_OVERRIDES and rank is not None and rank <= max_rank:
        return "low_rank", {"rank": rank, "energy": _round(energy), "max_rank": max_rank}
    return cause, detail


def _ratio(a: float, b: float) -> float | None:
    if b > 0 and math.isfinite(a) and math.isfinite(b):
        return a / b
    return None


#: What each cause usually means for a tensor that should not have moved.
_HINT = {
    "weight_decay": "frozen parameters are still in an optimizer with weight_decay > 0",
    "rescaled": "something multiplied the tensor by a constant (a conversion or merge scale)",
    "optimizer_step": "frozen parameters are still in the optimizer (zero gradients, stale momentum)",
    "running_stats": "normalisation statistics update in train() mode: put frozen norm layers in eval()",
    "precision_roundtrip": "the checkpoint was saved through a narrower dtype and back",
    "sparse_rows": "only a few rows moved (new token embeddings, a few classes of a head)",
    "reinitialized": "the tensor was re-initialised or replaced",
    "low_rank": "a low-rank update, as a merged LoRA adapter leaves",
    "nan_inf": "training diverged or overflowed",
    "dense_update": "gradients or an optimizer reach it: it is being trained",
}


def words(cause: str | None, detail: dict[str, Any] | None) -> str:
    """The cause in a few words with its key number, e.g. ``weight decay, Δ = −0.0032·W``."""
    if cause is None:
        return ""
    d = detail or {}
    if cause == "weight_decay":
        return f"weight decay, Δ = −{_g(d.get('c'))}·W"
    if cause == "rescaled":
        return f"rescaled, Δ = +{_g(d.get('c'))}·W"
    if cause == "optimizer_step":
        s = f"optimizer step, |Δ| ≈ {_g(d.get('typical_abs_delta'))} per element"
        if "decay_c" in d:
            s += f" (and decay −{_g(d['decay_c'])}·W)"
        return s
    if cause == "running_stats":
        return f"running statistics ({d.get('buffer')})"
    if cause == "precision_roundtrip":
        return f"precision round trip through {d.get('dtype')}"
    if cause == "sparse_rows":
        first = ", ".join(str(r) for r in d.get("first", []))
        more = ", …" if d.get("rows", 0) > len(d.get("first", [])) else ""
        label = "row" if len(d.get("first", [])) == 1 and not more else "rows"
        return f"{d.get('rows')} of {d.get('of')} rows changed ({label} {first}{more})"
    if cause == "reinitialized":
        if d.get("cosine") is None:
            return "reinitialized (zeroed)"
        return f"reinitialized, cos(new, old) = {_g(d.get('cosine'), 2)}"
    if cause == "low_rank":
        return f"low-rank update, rank {d.get('rank')} ({_g(100 * d.get('energy', 0), 4)}% of the energy)"
    if cause == "nan_inf":
        return f"NaN/Inf introduced ({d.get('nan_new')} NaN, {d.get('inf_new')} Inf)"
    return "an update with no simpler pattern"


def explain(cause: str | None, detail: dict[str, Any] | None) -> str:
    """:func:`words` followed by what the cause usually means, for a drifted frozen tensor."""
    if cause is None:
        return ""
    return f"{words(cause, detail)} — {_HINT.get(cause, '')}"


def evidence(detail: dict[str, Any] | None) -> str:
    """The numbers behind a cause on one line: ``c=0.003196, cosine=1, rel_l2=0.003196``."""
    if not detail:
        return ""
    return ", ".join(f"{k}={_g(v, 4) if isinstance(v, float) else v}" for k, v in detail.items())


def _g(x: Any, digits: int = 2) -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return f"{x:.{digits}g}"
    return "?"


__all__ = ["CAUSES", "Sums", "sums_of", "classify", "with_low_rank", "words", "explain", "evidence",
           "running_stat"]
