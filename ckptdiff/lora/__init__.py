"""Verify a LoRA merge: ``ckptdiff diff BASE MERGED --lora ADAPTER_DIR``.

A merged model must equal BASE everywhere except the adapter's targets, and
there ``BASE + scaling · B @ A`` (within the rounding a correct merge can
make, see :mod:`ckptdiff.lora.check`), or the adapter's full copy for
``modules_to_save``. This package adds that question to an ordinary diff
rather than a diff of its own: the engine compares BASE with MERGED under a
manifest made from the adapter (its targets trainable, everything else
frozen), and each tensor of the report then gets a
:class:`~ckptdiff.report.MergeCheck` verdict. Targets are checked one
module at a time, in blocks of rows, so memory stays flat.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ..checkpoint import Checkpoint, TensorRef
from ..engine import diff
from ..errors import CkptError
from ..manifest import Manifest
from ..progress import ProgressFn
from ..report import DiffReport, MergeCheck
from ..resolve import CheckpointLike, open_checkpoint
from .check import check_copy, check_delta
from .plan import Target, plan_merge

#: The --fail-on choices a merge check accepts ("change" would fail every merge).
FAIL_ON = ("drift", "never")


def verify_merge(base: CheckpointLike, merged: CheckpointLike, adapter: Checkpoint | str | os.PathLike[str], *,
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 fail_on: str | None = None, progress: ProgressFn | None = None) -> DiffReport:
    """Compare BASE with MERGED and say, per tensor, whether the merge of ``adapter`` explains it.

    Args:
        base, merged: paths, ``DIR@REF`` store references or open checkpoints.
        adapter: a PEFT adapter directory (or a checkpoint opened from one).
        include, exclude: globs on tensor names, as for :func:`ckptdiff.diff`.
        fail_on: ``drift`` (default: fail on any merge-off or change outside
            the adapter) or ``never``.

    Returns:
        The diff report with ``report.lora`` (the adapter's settings) and a
        ``merge`` verdict on every tensor; its ``exit_code`` is 1 when the
        merge does not verify.

    Raises:
        CkptError: unreadable input, a non-LoRA or unsupported adapter, or an
            adapter that does not fit BASE (a target BASE lacks, a shape or
            rank that does not match).
    """
    if fail_on is not None and fail_on not in FAIL_ON:
        raise CkptError(f"a LoRA merge check fails on drift or never, not {fail_on!r} "
                        "(every merged target changes, by design)")
    started = time.perf_counter()
    opened: list[Checkpoint] = []
    try:
        ad = _open_adapter(adapter, opened)
        a = _open(base, opened)
        b = _open(merged, opened)
        plan = plan_merge(ad, a)
        manifest = Manifest(trainable=tuple(_literal(n) for n in plan.targets), source=f"adapter {ad.path}")
        report = diff(a, b, manifest=manifest, include=include, exclude=exclude, fail_on=fail_on or "drift",
                      progress=progress)
        for td in report.tensors:
            target = plan.targets.get(td.name)
            if target is None:
                td.merge = MergeCheck("identical" if td.status == "identical" else "changed-outside")
            else:
                td.merge = _check(target, ad, a.get(td.name), b.get(td.name))
        report.lora = plan.describe(ad)
        report.elapsed_s = time.perf_counter() - started
        return report
    finally:
        for ck in reversed(opened):
            ck.close()


def _check(t: Target, adapter: Checkpoint, base: TensorRef | None,
           merged: TensorRef | None) -> MergeCheck:
    if merged is None or base is None:
        return MergeCheck("merge-off", t.kind, t.adapter_key, t.rank, t.scaling,
                          note=f"missing in {'MERGED' if merged is None else 'BASE'}")
    if t.kind == "copy":
        return check_copy(adapter[t.adapter_key], merged, t.adapter_key)
    if merged.shape != base.shape or merged.dtype_info.kind != "float":
        return MergeCheck("merge-off", t.kind, t.adapter_key, t.rank, t.scaling,
                          note=f"MERGED is {merged.dtype}{list(merged.shape)}, BASE {base.dtype}{list(base.shape)}")
    import numpy as np

    assert t.pair is not None and t.pair.b_key is not None and t.rank is not None and t.scaling is not None
    if t.kind == "lora-bias":
        bias = adapter[t.adapter_key].numpy().astype(np.float64).reshape(-1, 1)
        return check_delta(base, merged, bias, np.ones((1, 1)), rank=1, scaling=t.scaling, kind=t.kind,
                           adapter_key=t.adapter_key)
    a = adapter[t.adapter_key].numpy().astype(np.float64).reshape(t.rank, -1)
    b = adapter[t.pair.b_key].numpy().astype(np.float64).reshape(-1, t.rank)
    left, right = (a.T, b.T) if t.transpose else (b, a)
    return check_delta(base, merged, left, right, rank=t.rank, scaling=t.scaling, kind=t.kind,
                       adapter_key=t.adapter_key)


def _literal(name: str) -> str:
    """A tensor name as a manifest pattern that matches only itself, even with ``*?[`` in it."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _open(x: CheckpointLike, opened: list[Checkpoint]) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    ck = open_checkpoint(x)
    opened.append(ck)
    return ck


def _open_adapter(x: Checkpoint | str | os.PathLike[str], opened: list[Checkpoint]) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    from ..formats.peft_adapter import open_peft_adapter

    ck = open_peft_adapter(x)
    opened.append(ck)
    return ck


__all__ = ["FAIL_ON", "verify_merge"]
