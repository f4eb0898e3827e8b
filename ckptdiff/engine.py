"""The diff engine: two checkpoints in, one :class:`~ckptdiff.report.DiffReport` out.

The engine takes open checkpoints only: it knows nothing of file formats or
stores (:mod:`ckptdiff.resolve` turns what the user typed into a Checkpoint,
and :func:`ckptdiff.diff` does so before calling here) nor of screens
(renderers read the report). Per tensor it reads the layouts, hands
same-layout pairs to the streaming kernel in :mod:`ckptdiff.compare`, and
asks :mod:`ckptdiff.policy` for status, role, drift and staleness. Memory is
bounded by two chunks plus the kernel's float64 temporaries, whatever the
checkpoint size.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from bisect import bisect_right
from operator import add, attrgetter, sub
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)

from . import policy
from .cause import classify, sums_of
from .checkpoint import DEFAULT_CHUNK_BYTES, Checkpoint, SpanTable, TensorRef
from .dtypes import DTYPES
from .compare import (DIFFERS, PairResult, blake3_digest, changed_stats, compare_pair, compare_run, compare_spans,
                      hash_ref, in_worker_thread, measured_row)
from .errors import CkptError, NothingSelected
from .manifest import Manifest
from .progress import Meter, ProgressFn
from .report import FAIL_ON, DiffReport, Rows, SideInfo, TensorDiff

if TYPE_CHECKING:
    from typing import Any
    from .stats import DeltaStats


def diff(
    old: Checkpoint,
    new: Checkpoint,
    manifest: Manifest | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    fail_on: str | None = None,
    progress: ProgressFn | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int | None = None,
    rank: int | None = None,
    hash_identical: bool = True,
) -> DiffReport:
    """Compare two open checkpoints tensor by tensor (they are left open).

    ``manifest`` is a :class:`Manifest`, or None to use the manifest
    embedded in ``new``, else in ``old``, else none (every role ``unknown``);
    :func:`ckptdiff.diff` also takes paths, store refs and manifest files.

    ``atol``/``rtol`` only decide whether a change of a frozen tensor counts
    as drift (any element with ``|new-old| > atol + rtol*|old|``, or a NaN/Inf
    appearing); every bitwise change is reported with its numbers whatever
    the tolerance. ``include``/``exclude`` are fnmatch globs on full tensor
    names; ``include`` globs that select nothing from checkpoints that hold
    tensors raise :class:`~ckptdiff.errors.NothingSelected` (a typo must not
    pass as "no change"). ``fail_on`` (``drift``/``change``/``never``)
    defaults to ``drift`` when a manifest is known, else ``change``.

    ``workers``: threads comparing tensors side by side (default: one per
    core, up to 4, and one when the tensors are small; see _worker_count).
    The report is the same for any value.

    ``rank``: also test each changed matrix's delta for a numerical rank of
    at most ``rank`` (cause ``low_rank``; reads those tensors whole again).

    ``hash_identical=False``: identical tensors that are not stale get no
    BLAKE3 hash (their rows' hashes are None), for a report that only lists
    the tensors that differ or are stale; everything else is the same.
    """
    _check_tolerance("atol", atol)
    _check_tolerance("rtol", rtol)
    if fail_on is not None and fail_on not in FAIL_ON:
        raise CkptError(f"fail_on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise CkptError(f"workers must be a whole number >= 1, not {workers!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise CkptError(f"rank must be a whole number >= 1, not {rank!r}")
    include_pats = _patterns("include", include)
    exclude_pats = _patterns("exclude", exclude)

    for side in (old, new):
        if not isinstance(side, Checkpoint):
            raise TypeError(f"the engine takes open Checkpoints, got {type(side).__name__} "
                            "(ckptdiff.diff opens paths and DIR@REF store refs)")
    if manifest is not None and not isinstance(manifest, Manifest):
        raise TypeError(f"manifest must be a Manifest or None here, got {type(manifest).__name__}")

    started = time.perf_counter()
    man = policy.checkpoints_manifest(manifest, old, new)
    if (type(old.tensors) is SpanTable and type(new.tensors) is SpanTable and not include_pats
            and not exclude_pats):
        rows, ta, tb = _diff_tables(old.tensors, new.tensors, man, float(atol), float(rtol), chunk_bytes,
                                    workers, progress, hash_identical)
        if rank is not None:
            from .lowrank import apply_low_rank
            apply_low_rank(rows.listed(), ta, tb, rank)
        return _report(old, new, rows, man, atol, rtol, fail_on, include_pats, exclude_pats, started)
    ta, tb = _tensors(old), _tensors(new)
    names = _select(_union(ta, tb), include_pats, exclude_pats)
    if include_pats and not names and (ta or tb):
        raise NothingSelected(include_pats, exclude_pats, len(ta), len(tb))
    total = _total_bytes(names, ta, tb)
    meter = Meter(progress, total)
    atol_f, rtol_f = float(atol), float(rtol)
    advance = meter.advance if progress is not None else None  # no lock per tensor when nobody watches

    def one(item: list[str]) -> list[TensorDiff]:
        if len(item) == 1:
            n = item[0]
            # A trainable tensor that stays identical is listed (stale), with its hash.
            hashed = hash_identical or policy.role(man, n) == "trainable"
            return [_diff_one(n, ta.get(n), tb.get(n), man, atol_f, rtol_f, chunk_bytes, advance, hashed)]
        pairs = [(ta[n], tb[n]) for n in item]
        results = compare_run(pairs, atol=atol_f, rtol=rtol_f, chunk_bytes=chunk_bytes, progress=advance,
                              hash_identical=hash_identical)
        rows = [_same_layout(n, x, y, res, man) for n, (x, y), res in zip(item, pairs, results)]
        for td, (x, _y) in zip(rows, pairs):
            if td.stale and td.hash_old is None:
                td.hash_old = td.hash_new = hash_ref(x, chunk_bytes, None)
        return rows

    items = _plan(names, ta, tb, chunk_bytes)
    done = _map_items(one, items, ta, tb, _worker_count(workers, total, len(items)))
    by_name = {td.name: td for td in done}
    tensors = [by_name[n] for n in names]
    if rank is not None:
        from .lowrank import apply_low_rank
        apply_low_rank(tensors, ta, tb, rank)
    meter.finish()
    return _report(old, new, tensors, man, atol, rtol, fail_on, include_pats, exclude_pats, started)


def _report(old: Checkpoint, new: Checkpoint, tensors: Sequence[TensorDiff], man: Manifest | None, atol: float,
            rtol: float, fail_on: str | None, include_pats: list[str], exclude_pats: list[str],
            started: float) -> DiffReport:
    report = DiffReport(
        old=_side(old),
        new=_side(new),
        tensors=tensors,
        manifest_source=(man.source or "manifest") if man is not None else None,
        atol=float(atol),
        rtol=float(rtol),
        fail_on=fail_on or ("drift" if man is not None else "change"),
    )
    if include_pats or exclude_pats:
        report.extra["include"] = include_pats
        report.extra["exclude"] = exclude_pats
    report.elapsed_s = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------
# two tables: column by column
# ---------------------------------------------------------------------------

def _diff_tables(ta: SpanTable, tb: SpanTable, man: Manifest | None, atol: float, rtol: float, chunk_bytes: int,
                 workers: int | None, progress: ProgressFn | None,
                 hash_identical: bool = True) -> tuple[Rows, SpanTable, SpanTable]:
    """The diff of two column tables (safetensors files), with no Python object per identical tensor.

    The same answers as the path through refs (tested against it), in
    three steps: pair the names (one list comparison when both files list
    the same names in the same order, as two saves of one model do); send
    every same-layout pair small enough for a run to :func:`compare_spans`,
    in runs of neighbours read with one ``pread`` a side; and make a
    :class:`TensorDiff` only for the tensors that differ (or are stale, or
    are too big for a run, or exist on one side). Identical tensors stay
    columns of the :class:`Rows` until someone asks for their row.
    """
    names_a, names_b = ta.names, tb.names
    if names_a is names_b or names_a == names_b:
        names, pair_b, n_a = names_a, None, len(names_a)
    else:
        index_a, index_b = ta.index, tb.index
        names = names_a + [n for n in names_b if n not in index_a]
        pair_b = [index_b.get(n, -1) for n in names_a]  # row of each old tensor in new, -1: removed
        n_a = len(names_a)
    nb_a, off_a, off_b = ta.nbytes, ta.offsets, tb.offsets
    total = ta.total_bytes() + tb.total_bytes()
    meter = Meter(progress, total)
    advance = meter.advance if progress is not None else None

    # Which pairs can go into runs: same dtype and shape, at most RUN_TENSOR_MAX (and one chunk).
    small = min(RUN_TENSOR_MAX, chunk_bytes)
    cand: Sequence[int]
    if pair_b is None and ta.dtypes == tb.dtypes and ta.shapes == tb.shapes:
        cand = range(n_a) if not n_a or (min(nb_a) > 0 and max(nb_a) <= small) else [
            i for i, n in enumerate(nb_a) if 0 < n <= small]
    else:
        da, db, sa, sb = ta.dtypes, tb.dtypes, ta.shapes, tb.shapes
        cand = [i for i in range(n_a)
                if (j := i if pair_b is None else pair_b[i]) >= 0 and 0 < nb_a[i] <= small
                and da[i] == db[j] and sa[i] == sb[j]]
    slots: list[TensorDiff | None] = [None] * len(names)
    if type(cand) is range:
        singles = list(range(n_a, len(names)))
    else:
        in_runs = bytearray(n_a)
        for i in cand:
            in_runs[i] = 1
        singles = [i for i in range(len(names)) if i >= n_a or not in_runs[i]]
        del in_runs

    # Runs: candidates in old's file order (files whose header lists tensors in data order, as the
    # safetensors library writes them, need no sort), with new's offsets where they differ from old's.
    order: Sequence[int] = cand
    if pair_b is None and type(cand) is range and off_a == off_b and _in_order(off_a, nb_a):
        # Two saves of one model: only the window cuts, and no list per tensor is needed.
        runs, rel = _window_runs(off_a, nb_a, chunk_bytes)
        sizes = _int64s(nb_a)
    else:
        starts = _ints(off_a) if type(cand) is range else [off_a[i] for i in cand]
        if starts != sorted(starts):
            order = sorted(cand, key=off_a.__getitem__)
            starts = [off_a[i] for i in order]
        lengths = _ints(nb_a) if order is cand and type(cand) is range else [nb_a[i] for i in order]
        starts_b = [off_b[i] for i in order] if pair_b is None else [off_b[pair_b[i]] for i in order]
        runs, rel = _plan_runs(starts, lengths, starts_b, chunk_bytes)
        sizes = array("q", lengths)
        del starts, lengths, starts_b
    flags = bytearray(len(order))
    digests = bytearray(32 * len(order))  # the old side's, kept for the identical rows
    # Without hash_identical, the trainable tensors of the runs are still hashed when identical: stale rows are listed.
    stale_watch = None
    if not hash_identical and man is not None:
        stale_watch = bytearray(len(order))
        for p, i in enumerate(order):
            if policy.role(man, names[i]) == "trainable":
                stale_watch[p] = 1
    rel_v, size_v, flag_v, dig_v = memoryview(rel), memoryview(sizes), memoryview(flags), memoryview(digests)
    fd_a, fd_b, base_a, base_b = ta.fd, tb.fd, ta.base, tb.base

    def run(r: tuple[int, int, int, int]) -> None:
        s, e, oa, ob = r
        span = rel[e - 1] + sizes[e - 1]
        what = f"the {e - s} tensors from {names[order[s]]!r} on"
        new_digests = bytearray(32 * (e - s))  # the new side's, of the changed tensors of this run only
        va, vb, differ = compare_spans(fd_a, base_a + oa, fd_b, base_b + ob, span, rel_v[s:e], size_v[s:e],
                                       flag_v[s:e], dig_v[32 * s:32 * e], memoryview(new_digests), chunk_bytes,
                                       what, hash_identical)
        if stale_watch is not None:
            for p in range(s, e):
                if stale_watch[p] and not flags[p] & DIFFERS:
                    at = rel[p]
                    digests[32 * p:32 * p + 32] = blake3_digest(va[at:at + sizes[p]])
        if differ:
            for p in range(s, e):
                if flags[p] & DIFFERS:
                    i = order[p]
                    at, n, q = rel[p], sizes[p], 32 * (p - s)
                    slots[i] = _changed_row(names[i], ta.dtypes[i], ta.shapes[i], va[at:at + n], vb[at:at + n],
                                            digests[32 * p:32 * p + 32].hex(), new_digests[q:q + 32].hex(),
                                            man, atol, rtol)
        if advance is not None:
            advance(2 * span)

    def single(i: int) -> None:
        x = ta.ref(i) if i < n_a else None
        j = (i if i < n_a else -1) if pair_b is None else (pair_b[i] if i < n_a else tb.index[names[i]])
        y = tb.ref(j) if j >= 0 else None
        hashed = hash_identical or policy.role(man, names[i]) == "trainable"
        slots[i] = _diff_one(names[i], x, y, man, atol, rtol, chunk_bytes, advance, hashed)

    items: list[tuple[str, Any]] = [("run", r) for r in runs] + [("one", i) for i in singles]
    weight = [2 * (rel[r[1] - 1] + sizes[r[1] - 1]) for r in runs] + [2 * nb_a[i] if i < n_a else 0 for i in singles]

    def work(k: int) -> None:
        kind, arg = items[k]
        if kind == "run":
            run(arg)
        else:
            single(arg)

    _map_tensors(work, list(range(len(items))), weight, _worker_count(workers, total, len(items)))
    meter.finish()

    # Identical pairs: stale ones (trainable) get a row; the others stay columns.
    position = None if order is cand and type(cand) is range else {i: p for p, i in enumerate(order)}
    if man is not None:
        for i in cand:
            if slots[i] is None and policy.role(man, names[i]) == "trainable":
                slots[i] = _identical_row(i, ta, tb, pair_b, digests, i if position is None else position[i], man)
    kept = digests if hash_identical else None

    def make(i: int) -> TensorDiff:
        return _identical_row(i, ta, tb, pair_b, kept, i if position is None else position[i], man)

    return Rows(slots, make), ta, tb


def _changed_row(name: str, dtype: str, shape: tuple[int, ...], va: memoryview, vb: memoryview, hash_old: str,
                 hash_new: str, man: Manifest | None, atol: float, rtol: float) -> TensorDiff:
    """The row of a same-layout pair whose bytes differ, both sides in memory (a tensor of a run)."""
    info = DTYPES[dtype]
    numel = 1
    for d in shape:
        numel *= d
    td = TensorDiff(name, policy.same_layout_status(False), policy.role(man, name), False, False, dtype, dtype,
                    list(shape), list(shape), numel, hash_old, hash_new)
    got = measured_row(info, va, vb, atol, rtol, shape, numel, name)  # numbers and cause in one C call
    if got is None:  # no C module for it: DeltaStats, then cause.classify
        _with_stats(td, changed_stats(info, va, vb, atol, rtol, shape))
    else:
        (td.changed_elements, td.out_of_tolerance, td.nan_new, td.inf_new, td.max_abs_delta, td.mean_abs_delta,
         td.rel_l2, td.cause, td.cause_detail) = got
    return policy.judge(td)


def _in_order(offsets: Sequence[int], nbytes: Sequence[int]) -> bool:
    """Whether tensors listed in this order lie in file order, each after the previous one's end, with
    gaps of at most RUN_MAX_GAP (any file the safetensors library wrote)."""
    if len(offsets) < 2:
        return True
    gaps = list(map(sub, offsets[1:], map(add, offsets, nbytes)))  # mostly 0: shared small ints
    return min(gaps) >= 0 and max(gaps) <= RUN_MAX_GAP


def _window_runs(offsets: Sequence[int], nbytes: Sequence[int], window: int) -> tuple[
        list[tuple[int, int, int, int]], array[int]]:
    """Runs of tensors in file order (see _in_order) at the same offsets on both sides, cut only by
    the window: one bisection per run instead of a step per tensor."""
    n = len(offsets)
    rel = array("q", bytes(8 * n))
    runs: list[tuple[int, int, int, int]] = []
    s = 0
    while s < n:
        lo = offsets[s]
        e = bisect_right(offsets, lo + window, s + 1)
        if e > s + 1 and offsets[e - 1] + nbytes[e - 1] > lo + window:
            e -= 1  # tensors do not overlap: only the last one found can end past the window
        runs.append((s, e, lo, lo))
        rel[s:e] = array("q", [x - lo for x in offsets[s:e]])
        s = e
    return runs, rel


def _plan_runs(starts: list[int], lengths: list[int], starts_b: list[int],
               window: int) -> tuple[list[tuple[int, int, int, int]], array[int]]:
    """Cut tensors sorted by old offset into runs; returns the runs and each tensor's offset in its run.

    A run is ``(first, end, old offset, new offset)`` over positions
    ``first..end-1``: neighbours whose new offsets (``starts_b``) keep the
    distances of the old ones, with gaps of at most RUN_MAX_GAP, spanning
    at most ``window`` bytes.
    """
    n = len(starts)
    rel = array("q", bytes(8 * n))
    runs: list[tuple[int, int, int, int]] = []
    start = lo = key = 0
    end = -(1 << 62)  # the first tensor starts a run
    gap = RUN_MAX_GAP
    for p, (oa, nb, ob) in enumerate(zip(starts, lengths, starts_b)):
        stop = oa + nb
        if ob - oa != key or oa - end > gap or (stop if stop > end else end) - lo > window:
            if p:
                runs.append((start, p, lo, lo + key))
            start, lo, end, key = p, oa, stop, ob - oa
        elif stop > end:
            end = stop
        rel[p] = oa - lo
    if n:
        runs.append((start, n, lo, lo + key))
    return runs, rel


def _int64s(column: Any) -> array[int]:
    """A column as an int64 array."""
    if isinstance(column, memoryview):
        out = array("q")
        out.frombytes(column.cast("B"))
        return out
    return array("q", column)


def _ints(column: Any) -> list[int]:
    """A column as a list (an int64 memoryview's ``tolist`` runs in C)."""
    return column.tolist() if isinstance(column, memoryview) else list(column)


def _identical_row(i: int, ta: SpanTable, tb: SpanTable, pair_b: list[int] | None, digests: bytearray | None,
                   p: int, man: Manifest | None) -> TensorDiff:
    """The row of a bitwise-identical same-layout pair, from the columns and its digest (None: not hashed)."""
    h = None if digests is None else digests[32 * p:32 * p + 32].hex()
    shape = ta.shapes[i]
    numel = 1
    for d in shape:
        numel *= d
    dtype = ta.dtypes[i]
    td = TensorDiff(name=ta.names[i], status=policy.same_layout_status(True), role=policy.role(man, ta.names[i]), dtype_old=dtype,
                    dtype_new=dtype, shape_old=list(shape), shape_new=list(shape), numel=numel, hash_old=h,
                    hash_new=h)
    return policy.judge(td)


# ---------------------------------------------------------------------------
# one tensor
# ---------------------------------------------------------------------------

def _diff_one(
    name: str,
    old: TensorRef | None,
    new: TensorRef | None,
    manifest: Manifest | None,
    atol: float,
    rtol: float,
    chunk_bytes: int,
    advance: Callable[[int], None] | None,
    hash_identical: bool = True,
) -> TensorDiff:
    if old is not None and new is not None and old.shape == new.shape and old.dtype == new.dtype:
        res = compare_pair(old, new, atol=atol, rtol=rtol, chunk_bytes=chunk_bytes, progress=advance,
                           hash_identical=hash_identical)
        return _same_layout(name, old, new, res, manifest)
    td = _start(name, old, new, manifest)
    if old is None or new is None:
        side = new if new is not None else old
        assert side is not None
        td.status = policy.status(old, new, None)
        h = hash_ref(side, chunk_bytes, advance)
        if old is None:
            td.hash_new = h
        else:
            td.hash_old = h
    else:  # a layout change
        td.status = policy.status(old, new, None)
        td.hash_old = hash_ref(old, chunk_bytes, advance)
        td.hash_new = hash_ref(new, chunk_bytes, advance)
    return policy.judge(td)


def _start(name: str, old: TensorRef | None, new: TensorRef | None, manifest: Manifest | None) -> TensorDiff:
    td = TensorDiff(name=name, status="identical", role=policy.role(manifest, name))
    td.numel = new.numel if new is not None else old.numel if old is not None else None  # NEW's count when shapes differ
    if old is not None:
        td.dtype_old, td.shape_old = old.dtype, list(old.shape)
    if new is not None:
        td.dtype_new, td.shape_new = new.dtype, list(new.shape)
    return td


def _same_layout(name: str, old: TensorRef, new: TensorRef, res: PairResult, manifest: Manifest | None) -> TensorDiff:
    """The TensorDiff of a same-layout pair, from the kernel's answer, made in one constructor call
    (most tensors of a many-tensor model come through here)."""
    shape = old.shape
    td = TensorDiff(name=name, status=policy.status(old, new, res.stats is None), role=policy.role(manifest, name),
                    dtype_old=old.dtype, dtype_new=new.dtype, shape_old=list(shape), shape_new=list(shape),
                    numel=old.numel, hash_old=res.hash_old, hash_new=res.hash_new)
    if res.stats is not None:
        _with_stats(td, res.stats)
    return policy.judge(td)


def _with_stats(td: TensorDiff, s: DeltaStats) -> None:
    """A changed tensor's numbers and the cause they point to."""
    td.changed_elements = s.changed_elements
    td.out_of_tolerance = s.out_of_tolerance
    td.nan_new = s.nan_new
    td.inf_new = s.inf_new
    td.max_abs_delta = s.max_abs_delta if s.finite_both else None
    td.mean_abs_delta = s.mean_abs_delta
    td.rel_l2 = s.rel_l2
    td.cause, td.cause_detail = classify(sums_of(td.name, td.shape_old or [], s))


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def _tensors(ck: Checkpoint) -> dict[str, TensorRef]:
    """The name -> ref dict, read once: every Mapping lookup on a Checkpoint is a Python call."""
    return dict(ck.tensors) if type(ck) is Checkpoint else dict(ck.items())


def _total_bytes(names: list[str], ta: dict[str, TensorRef], tb: dict[str, TensorRef]) -> int:
    """Bytes to compare, both sides (for progress and the thread decision)."""
    size = attrgetter("nbytes")
    if len(names) == len(ta) == len(tb):
        # The union is as large as each side: the same names on both, none selected away (the usual case).
        return sum(map(size, ta.values())) + sum(map(size, tb.values()))
    return sum(ta[n].nbytes for n in names if n in ta) + sum(tb[n].nbytes for n in names if n in tb)


def _union(a: Mapping[str, TensorRef], b: Mapping[str, TensorRef]) -> list[str]:
    """Old order first, then the names only in new, in new's order."""
    return list(a) + [n for n in b if n not in a]


def _patterns(what: str, pats: Iterable[str] | None) -> list[str]:
    if pats is None:
        return []
    if isinstance(pats, str):
        return [pats]
    out = list(pats)
    if not all(isinstance(p, str) for p in out):
        raise CkptError(f"{what} patterns must be strings")
    return out


def _select(names: list[str], include: list[str], exclude: list[str]) -> list[str]:
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    if exclude:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return names


def _side(ck: Checkpoint) -> SideInfo:
    return SideInfo(path=ck.path, format=ck.format, tensors=len(ck), bytes=ck.total_bytes)


def _check_tolerance(name: str, value: float) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CkptError(f"{name} must be a number, not {value!r}") from None
    if not (v >= 0.0) or v == float("inf"):
        raise CkptError(f"{name} must be a finite number >= 0, not {value!r}")


#: Below this many bytes to compare, threads cost more than they save.
PARALLEL_MIN_BYTES = 8 << 20
#: Nor when tensor pairs average less than this (both sides' bytes): then the
#: per-tensor Python work, which holds the GIL, outweighs the reading and
#: hashing that threads overlap. Measured with uniform float32 tensors, best
#: of 6 in-process, one vs two threads: 64 KiB a side 0.055 s vs 0.061 s,
#: 96 KiB 0.070 vs 0.071 (break-even), 128 KiB 0.089 vs 0.076, 256 KiB 0.075
#: vs 0.053 (measured before runs existed). Counted per work item: a run of
#: small neighbours (see _plan) is one item, so a model of many small
#: tensors in runs of up to a chunk (1 MiB) gets every core.
PARALLEL_MIN_AVG_BYTES = 192 << 10
#: More threads than this stop paying off: two streams per tensor saturate memory bandwidth.
MAX_WORKERS = 4


def _worker_count(requested: int | None, total_bytes: int, count: int) -> int:
    if requested is not None:
        return requested
    if count < 2 or total_bytes < PARALLEL_MIN_BYTES or total_bytes < PARALLEL_MIN_AVG_BYTES * count:
        return 1
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


#: Tensors up to this size may be batched into runs (compare.compare_run);
#: bigger ones gain nothing from sharing a read and go one by one.
RUN_TENSOR_MAX = 1 << 20
#: Padding allowed between neighbours of a run (alignment); a bigger gap
#: means another tensor lies between them, and reading it would be waste.
RUN_MAX_GAP = 4096


def _plan(names: list[str], ta: Mapping[str, TensorRef], tb: Mapping[str, TensorRef],
          chunk_bytes: int) -> list[list[str]]:
    """Group the work: runs of small neighbouring same-layout pairs, every other name alone.

    A run needs, for each pair: the same dtype and shape on both sides (so
    status identical or changed), a ``file_span`` on both sides and no known
    hash; and along the run: one descriptor per side, new's tensors at the
    same distances from the run's start as old's (true whenever both files
    were written by the same code), gaps of at most RUN_MAX_GAP, and at most
    ``chunk_bytes`` spanned. Order inside the plan does not matter: results
    are put back in ``names`` order.
    """
    # One pass over the names, reading each ref's fields once: at 200,000
    # tensors this plan was a fifth of the engine's time.
    cand: list[tuple[int, int, int, int, int, str]] = []
    items: list[list[str]] = []
    get_a, get_b = ta.get, tb.get
    for n in names:
        x, y = get_a(n), get_b(n)
        if x is not None and y is not None:
            sx, sy = x.file_span, y.file_span
            if (sx is not None and sy is not None and x.hash is None and y.hash is None
                    and x.dtype == y.dtype and x.shape == y.shape):
                nb = x.nbytes
                if 0 < nb <= RUN_TENSOR_MAX:
                    cand.append((sx[0], sx[1], sy[0], sy[1], nb, n))
                    continue
        items.append([n])
    cand.sort()
    run: list[str] = []
    key: tuple[int, int, int] = (0, 0, 0)  # fd_a, fd_b, offset_b - offset_a
    start = end = 0
    for fd_a, off_a, fd_b, off_b, nb, n in cand:
        k = (fd_a, fd_b, off_b - off_a)
        stop = off_a + nb
        if run and k == key and off_a - end <= RUN_MAX_GAP and (stop if stop > end else end) - start <= chunk_bytes:
            run.append(n)
            if stop > end:
                end = stop
            continue
        if run:
            items.append(run)
        run, key, start, end = [n], k, off_a, stop
    if run:
        items.append(run)
    return items


def _map_items(fn: Callable[[list[str]], list[TensorDiff]], items: list[list[str]],
               ta: Mapping[str, TensorRef], tb: Mapping[str, TensorRef], workers: int) -> list[TensorDiff]:
    """``fn`` over every work item, spread over threads; the TensorDiffs in plan order."""
    if workers <= 1 or len(items) < 2:
        return [td for item in items for td in fn(item)]

    def size(n: str) -> int:
        return (ta[n].nbytes if n in ta else 0) + (tb[n].nbytes if n in tb else 0)

    weight = [sum(size(n) for n in item) for item in items]
    parts = _map_tensors(lambda i: fn(items[i]), list(range(len(items))), weight, workers)
    return [td for part in parts for td in part]


def _map_tensors(fn: Callable[[Any], Any], names: list[Any], sizes: Any,
                 workers: int) -> list[Any]:
    """``[fn(n) for n in names]``, spread over threads, results in ``names`` order.

    Threads are enough for both cores: BLAKE3, memcmp (ctypes), pread and
    numpy all release the GIL for the bulk of the work. Biggest tensors go
    first so that one huge embedding does not start last and run alone.

    Each worker pulls the next index from one shared iterator (``next`` on a
    list iterator is atomic under the GIL) and writes its slot of the result
    list: no futures, queues or condition variables per tensor. Through
    ``ThreadPoolExecutor`` those hand-offs cost as much as two threads saved
    on a 2,000-tensor model (0.120 s on two threads vs 0.120 s on one).
    """
    if workers <= 1 or len(names) < 2:
        return [fn(n) for n in names]
    order = iter(sorted(range(len(names)), key=lambda i: -sizes[names[i]]))
    results: list[TensorDiff | None] = [None] * len(names)
    errors: list[BaseException] = []

    def work() -> None:
        in_worker_thread()
        try:
            for i in order:
                if errors:
                    return
                results[i] = fn(names[i])
        except BaseException as e:  # re-raised on the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=work, name=f"ckptdiff-{k}", daemon=True)
               for k in range(min(workers, len(names)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as e:  # Ctrl-C while waiting: stop the workers after their current tensor
        errors.append(e)
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]  # every slot is filled when no worker failed


__all__ = ["diff", "ProgressFn"]
