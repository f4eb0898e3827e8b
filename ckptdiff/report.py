"""DiffReport: the one result every renderer, the CLI and the TUI read.

The engine (``ckptdiff.diff``) fills it; nothing here reads files. The JSON
form (:meth:`DiffReport.to_dict`) is a stable, documented schema,
``ckptdiff.diff/2``: fields are only ever added, never renamed or removed
(docs/json-schema.md says what changed from ``/1``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

SCHEMA = "ckptdiff.diff/2"

#: Status values, in the order summaries list them.
STATUSES = ("identical", "changed", "added", "removed", "shape_changed", "dtype_changed")
FAIL_ON = ("drift", "change", "never")
#: Per-tensor verdicts of a LoRA merge check (``ckptdiff diff BASE MERGED --lora ADAPTER``).
MERGE_VERDICTS = ("merge-exact", "merge-off", "changed-outside", "identical")


class _Record:
    """Repr and field-wise equality over ``FIELDS``: what ``@dataclass`` gave these value classes,
    without importing ``dataclasses`` (which imports ``inspect``: a fifth of ckptdiff's start-up)."""

    __slots__ = ()
    FIELDS: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.FIELDS)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq


class MergeCheck(_Record):
    """How one tensor of a merged model relates to BASE and the adapter (see ``ckptdiff.lora``).

    ``kind`` says what the adapter holds for the tensor: ``lora`` (MERGED must
    be BASE + scaling * B @ A), ``lora-bias`` (BASE bias + scaling * lora_B's
    bias), ``copy`` (a full copy, ``modules_to_save``: MERGED must equal it
    bitwise), or None (not in the adapter: MERGED must equal BASE bitwise).
    """

    FIELDS = ("verdict", "kind", "adapter_key", "rank", "scaling", "max_error", "tolerance_ratio", "elements_off",
              "note")

    def __init__(self, verdict: str, kind: str | None = None, adapter_key: str | None = None, rank: int | None = None,
                 scaling: float | None = None, max_error: float | None = None, tolerance_ratio: float | None = None,
                 elements_off: int | None = None, note: str | None = None) -> None:
        self.verdict = verdict                  # one of MERGE_VERDICTS
        self.kind = kind                        # lora | lora-bias | copy | None
        self.adapter_key = adapter_key          # the adapter tensor it was checked against (lora_A's for a pair)
        self.rank = rank
        self.scaling = scaling
        self.max_error = max_error              # max |MERGED - expected| over the elements
        self.tolerance_ratio = tolerance_ratio  # max of |MERGED - expected| / tolerance; <= 1 is merge-exact
        self.elements_off = elements_off        # elements beyond their tolerance
        self.note = note                        # why, when numbers cannot say it (missing, shape or dtype differs)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _MERGE_FIELDS}
        for k in ("scaling", "max_error", "tolerance_ratio"):
            d[k] = _json_float(d[k])
        return d


class TensorDiff(_Record):
    """One tensor name from the union of both sides.

    Slotted: a report holds one per tensor, and 200,000 of them with a
    ``__dict__`` each would be most of a many-tensor diff's memory.

    * ``status``: one of STATUSES; ``role``: trainable | frozen | buffer | unknown.
    * ``drift``: frozen and moved beyond tolerance / removed / reshaped; ``stale``: trainable but bitwise identical.
    * ``numel``: elements compared (the new side's count when shapes differ).
    * ``hash_old``/``hash_new``: BLAKE3 hex of the raw little-endian bytes.
    * ``max_abs_delta``, ``mean_abs_delta``, ``rel_l2`` (``||new-old|| / ||old||``; inf when old is all
      zeros and new is not), ``changed_elements``, ``nan_new``/``inf_new`` (NaNs/Infs in new at positions
      where old had none): only for 'changed'.
    * ``out_of_tolerance``: elements beyond ``atol + rtol*|old|`` (or that became NaN/Inf), what decides
      drift; equals ``changed_elements`` at zero tolerance.
    * ``cause``: why a 'changed' tensor moved, one of ckptdiff.cause.CAUSES; ``cause_detail`` holds the
      numbers behind it (docs/causes.md).
    * ``merge``: only with a LoRA merge check, this tensor's merge verdict, else None.
    """

    FIELDS = ("name", "status", "role", "drift", "stale", "dtype_old", "dtype_new", "shape_old", "shape_new",
              "numel", "hash_old", "hash_new", "max_abs_delta", "mean_abs_delta", "rel_l2", "changed_elements",
              "nan_new", "inf_new", "out_of_tolerance", "cause", "cause_detail", "merge")
    __slots__ = FIELDS

    def __init__(self, name: str, status: str, role: str = "unknown", drift: bool = False, stale: bool = False,
                 dtype_old: str | None = None, dtype_new: str | None = None, shape_old: list[int] | None = None,
                 shape_new: list[int] | None = None, numel: int | None = None, hash_old: str | None = None,
                 hash_new: str | None = None, max_abs_delta: float | None = None,
                 mean_abs_delta: float | None = None, rel_l2: float | None = None,
                 changed_elements: int | None = None, nan_new: int | None = None, inf_new: int | None = None,
                 out_of_tolerance: int | None = None, cause: str | None = None,
                 cause_detail: dict[str, Any] | None = None, merge: MergeCheck | None = None) -> None:
        self.name, self.status, self.role, self.drift, self.stale = name, status, role, drift, stale
        self.dtype_old, self.dtype_new, self.shape_old, self.shape_new = dtype_old, dtype_new, shape_old, shape_new
        self.numel, self.hash_old, self.hash_new = numel, hash_old, hash_new
        self.max_abs_delta, self.mean_abs_delta, self.rel_l2 = max_abs_delta, mean_abs_delta, rel_l2
        self.changed_elements, self.nan_new, self.inf_new = changed_elements, nan_new, inf_new
        self.out_of_tolerance, self.cause, self.cause_detail, self.merge = out_of_tolerance, cause, cause_detail, merge

    def copy(self) -> TensorDiff:
        """A shallow copy (its lists and dicts shared)."""
        return TensorDiff(*(getattr(self, k) for k in self.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive deep copy took 15 us a tensor,
        # most of the JSON rendering time of a 2,000-tensor report.
        # One attrgetter call reads every field (a 200,000-tensor report makes this row 200,000 times).
        d = dict(zip(_TENSOR_FIELDS, _TENSOR_VALUES(self)))
        if self.merge is None:
            del d["merge"]  # present only in a LoRA merge check's report, like its top-level "lora"
        else:
            d["merge"] = self.merge.to_dict()
        for k in ("shape_old", "shape_new"):
            v = d[k]
            if v is not None and type(v) is not list:
                d[k] = list(v)
        if self.max_abs_delta is not None or self.mean_abs_delta is not None or self.rel_l2 is not None:
            for k in ("max_abs_delta", "mean_abs_delta", "rel_l2"):
                d[k] = _json_float(d[k])
        if d["cause_detail"] is not None:
            d["cause_detail"] = {k: _json_float(v) if isinstance(v, float) else v
                                 for k, v in d["cause_detail"].items()}
        return d


class Rows(Sequence[TensorDiff]):
    """A report's rows in report order; rows of unremarkable identical tensors stay columns until asked for.

    A 200,000-tensor diff of a fine-tune is mostly identical frozen tensors.
    Holding a :class:`TensorDiff` for each would be most of the diff's time
    and memory, and every renderer shows them as one count unless asked to
    list them. So a slot is either a row or None: None stands for an
    identical tensor that is not stale (nor anything else worth a row),
    which ``make(i)`` builds, and caches, the first time anyone indexes or
    iterates over it. Everything else (summaries, verdicts, the rows a
    renderer lists) reads :meth:`listed` and :meth:`omitted`, which never
    build them.
    """

    __slots__ = ("_slots", "_make", "_omitted", "_listed")

    def __init__(self, slots: list[TensorDiff | None], make: Callable[[int], TensorDiff]) -> None:
        self._slots = slots
        self._make = make
        self._omitted = slots.count(None)
        self._listed: list[TensorDiff] | None = None  # listed(), until a row is built

    def __len__(self) -> int:
        return len(self._slots)

    def _row(self, i: int) -> TensorDiff:
        td = self._slots[i]
        if td is None:
            td = self._slots[i] = self._make(i)
            self._omitted -= 1
            self._listed = None
        return td

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._row(k) for k in range(*i.indices(len(self._slots)))]
        n = len(self._slots)
        if not -n <= i < n:
            raise IndexError("row index out of range")
        return self._row(i % n)

    def __iter__(self) -> Iterator[TensorDiff]:
        return map(self._row, range(len(self._slots)))

    def peek(self, i: int) -> TensorDiff:
        """Row ``i``, built afresh if it is a column (and not kept): for writers that list every row once."""
        td = self._slots[i]
        return td if td is not None else self._make(i)

    def listed(self) -> list[TensorDiff]:
        """The rows that are not columns: every tensor that differs or is stale, plus any row built on request.

        Summaries, verdicts and renderers each read it, so it is kept (as a new list for each caller)."""
        if self._listed is None:
            self._listed = [td for td in self._slots if td is not None]
        return self._listed.copy()

    def omitted(self) -> int:
        """How many identical tensors are still columns (never drifted, never stale)."""
        return self._omitted


def rows_to_list(rows: Sequence[TensorDiff], show_all: bool) -> Iterator[TensorDiff]:
    """The rows a report lists: every row with ``show_all``, else those of tensors that differ or are stale."""
    if show_all:
        if isinstance(rows, Rows):
            return map(rows.peek, range(len(rows)))
        return iter(rows)
    pool = rows.listed() if isinstance(rows, Rows) else rows
    return (t for t in pool if t.status != "identical" or t.stale)


def _materialized(rows: Sequence[TensorDiff]) -> Sequence[TensorDiff]:
    """Rows that can differ, drift or be stale: a Rows' columns are identical and unremarkable by construction."""
    return rows.listed() if isinstance(rows, Rows) else rows


_TENSOR_FIELDS = TensorDiff.FIELDS
_TENSOR_VALUES = attrgetter(*_TENSOR_FIELDS)
#: A row's field names in schema order, and one call that reads them all from a TensorDiff (for writers).
ROW_FIELDS, row_values = _TENSOR_FIELDS, _TENSOR_VALUES
_MERGE_FIELDS = MergeCheck.FIELDS


def _json_float(x: float | None) -> float | str | None:
    """JSON has no inf/nan: write them as strings so the output stays standard JSON."""
    if x is None:
        return None
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return x


class SideInfo(_Record):
    FIELDS = ("path", "format", "tensors", "bytes")

    def __init__(self, path: str, format: str, tensors: int, bytes: int) -> None:  # noqa: A002 - schema names
        self.path, self.format, self.tensors, self.bytes = path, format, tensors, bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "tensors": self.tensors, "bytes": self.bytes}


class DiffReport(_Record):
    """The diff of two checkpoints: both sides, every tensor's row, the policy it was judged by."""

    FIELDS = ("old", "new", "tensors", "manifest_source", "atol", "rtol", "fail_on", "elapsed_s", "extra", "lora")

    def __init__(self, old: SideInfo, new: SideInfo, tensors: Sequence[TensorDiff],
                 manifest_source: str | None = None, atol: float = 0.0, rtol: float = 0.0, fail_on: str = "change",
                 elapsed_s: float = 0.0, extra: dict[str, Any] | None = None,
                 lora: dict[str, Any] | None = None) -> None:
        self.old, self.new = old, new
        #: Every tensor's row, in order: a list, or :class:`Rows` (identical ones built on demand).
        self.tensors = tensors
        self.manifest_source = manifest_source  # None: no manifest, roles are 'unknown'
        self.atol, self.rtol = atol, rtol
        self.fail_on = fail_on                  # drift | change | never
        self.elapsed_s = elapsed_s
        self.extra: dict[str, Any] = {} if extra is None else extra
        #: Only with a LoRA merge check: the adapter and its settings (JSON-ready), else None.
        self.lora = lora

    @property
    def drifted(self) -> list[TensorDiff]:
        return [t for t in _materialized(self.tensors) if t.drift]

    @property
    def stale(self) -> list[TensorDiff]:
        return [t for t in _materialized(self.tensors) if t.stale]

    @property
    def changed(self) -> list[TensorDiff]:
        """Every tensor that is not identical (changed, added, removed, reshaped, retyped)."""
        return [t for t in _materialized(self.tensors) if t.status != "identical"]

    def summary(self) -> dict[str, int]:
        counts = Counter(t.status for t in _materialized(self.tensors))
        if isinstance(self.tensors, Rows):
            counts["identical"] += self.tensors.omitted()
        out = {s: counts.get(s, 0) for s in STATUSES}
        out["total"] = len(self.tensors)
        out["drifted"] = len(self.drifted)
        out["stale"] = len(self.stale)
        return out

    def verdict(self) -> tuple[bool, list[str]]:
        """(failed, reasons) under ``fail_on``: it failed exactly when there is a reason."""
        reasons = list(self.reasons())
        return bool(reasons), reasons

    def reasons(self) -> Iterator[str]:
        """Why the report fails, one sentence per tensor, worded as they are read (writers stream them)."""
        if self.lora is not None:
            yield from self._merge_reasons()
        elif self.fail_on == "drift":
            for t in self.drifted:
                yield f"frozen tensor {t.name} {_what(t)}"
        elif self.fail_on == "change":
            for t in self.changed:
                yield f"tensor {t.name} {_what(t)}"

    def merge_summary(self) -> dict[str, int]:
        """How many tensors got each merge verdict (all zero without a LoRA merge check)."""
        counts = Counter(t.merge.verdict for t in _materialized(self.tensors) if t.merge is not None)
        return {v: counts.get(v, 0) for v in MERGE_VERDICTS}

    def _merge_reasons(self) -> Iterator[str]:
        """A merge check fails on any target off its expected value or any other tensor changed."""
        if self.fail_on == "never":
            return
        for t in _materialized(self.tensors):
            m = t.merge
            if m is not None and m.verdict == "merge-off":
                yield f"tensor {t.name} {merge_off_text(m)}"
            elif m is not None and m.verdict == "changed-outside":
                yield f"tensor {t.name} is not in the adapter but {_what(t)}"

    @property
    def failed(self) -> bool:
        """``verdict()[0]``, without wording a reason per tensor."""
        if self.lora is not None:
            return next(self._merge_reasons(), None) is not None
        rows = _materialized(self.tensors)
        if self.fail_on == "drift":
            return any(t.drift for t in rows)
        if self.fail_on == "change":
            return any(t.status != "identical" for t in rows)
        return False

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_dict(self, tensors: bool = True, identical: bool = True, reasons: bool = True) -> dict[str, Any]:
        """The ``ckptdiff.diff/2`` document.

        ``identical=False`` lists only the tensors that differ or are stale
        (what ``ckptdiff diff --format json`` prints without ``--all``) and
        counts the others in ``"omitted_identical"``; a LoRA merge check
        lists every tensor whatever it says. ``tensors=False``
        leaves the rows out (``"tensors"`` is then None), and ``reasons=False``
        the verdict's reasons (then None, and ``"failed"`` still says whether
        there are any), for writers that stream them.
        """
        failed, why = self.verdict() if reasons else (self.failed, None)
        summary = self.summary()
        identical = identical or self.lora is not None  # a merge check's point is every tensor's verdict
        rows = list(rows_to_list(self.tensors, identical)) if tensors else None
        return {
            "schema": SCHEMA,
            "old": self.old.to_dict(),
            "new": self.new.to_dict(),
            "manifest": self.manifest_source,
            "atol": self.atol,
            "rtol": self.rtol,
            "fail_on": self.fail_on,
            "summary": summary,
            "omitted_identical": 0 if identical else self.omitted_identical(),
            "tensors": [t.to_dict() for t in rows] if rows is not None else None,
            "verdict": {"failed": failed, "reasons": why},
        } | ({"lora": {**self.lora, "summary": self.merge_summary()}} if self.lora is not None else {})

    def omitted_identical(self) -> int:
        """How many rows a listing without ``--all`` leaves out: identical tensors that are not stale."""
        return sum(1 for t in _materialized(self.tensors) if t.status == "identical" and not t.stale) + (
            self.tensors.omitted() if isinstance(self.tensors, Rows) else 0)

    def to_json(self, indent: int | None = 2, identical: bool = True) -> str:
        return json.dumps(self.to_dict(identical=identical), indent=indent, allow_nan=False)


#: What MERGED should equal, per MergeCheck.kind, in the words of messages.
_EXPECTED = {"lora": "BASE + scaling·B@A beyond tolerance",
             "lora-bias": "BASE + scaling·lora_B.bias beyond tolerance",
             "copy": "the adapter's copy"}


def merge_off_text(m: MergeCheck) -> str:
    """``merge-off by X (...)``: what every renderer says about a target that does not verify."""
    if m.max_error is None:
        return f"merge-off ({m.note})" if m.note else "merge-off"
    expected = _EXPECTED.get(m.kind or "", "expected")
    return f"merge-off by {m.max_error:.3g} ({m.elements_off} elements differ from {expected})"


def _what(t: TensorDiff) -> str:
    if t.status == "changed":
        delta = "n/a" if t.max_abs_delta is None else "%.3g" % t.max_abs_delta
        extra = ""
        if t.nan_new:
            extra = f", {t.nan_new} new NaN"
        if t.inf_new:
            extra += f", {t.inf_new} new Inf"
        return f"changed (max |Δ| {delta}, {t.changed_elements} of {t.numel} elements{extra})"
    if t.status == "shape_changed":
        return f"changed shape {t.shape_old} -> {t.shape_new}"
    if t.status == "dtype_changed":
        return f"changed dtype {t.dtype_old} -> {t.dtype_new}"
    return t.status
