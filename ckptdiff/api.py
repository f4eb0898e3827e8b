"""The public :func:`ckptdiff.diff`: what the user typed in, one report out.

It resolves paths, store refs and manifest files (:mod:`ckptdiff.resolve`)
and hands open checkpoints to the engine, which takes nothing else. (This
module is not named ``diff``: a submodule of that name would replace the
function on the package as soon as anything imported it.)
"""

from __future__ import annotations

from collections.abc import Iterable

from . import engine
from .checkpoint import DEFAULT_CHUNK_BYTES
from .progress import ProgressFn
from .report import DiffReport
from .resolve import CheckpointLike, ManifestLike, load_manifest, opened


def diff(
    old: CheckpointLike,
    new: CheckpointLike,
    manifest: ManifestLike = None,
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
    """Compare two checkpoints tensor by tensor.

    ``old``/``new`` are paths, ``DIR@REF`` store references or open
    :class:`~ckptdiff.checkpoint.Checkpoint` objects (those are left open;
    paths opened here are closed before returning). ``manifest`` is a
    :class:`~ckptdiff.manifest.Manifest`, a path to a manifest JSON file, a
    dict in that format, or None to use the manifest embedded in ``new``,
    else in ``old``, else none (every role ``unknown``). Training state saved
    beside the model (``Checkpoint.auxiliary``) counts as buffers.

    ``atol``/``rtol`` only decide whether a change of a frozen tensor counts
    as drift (any element with ``|new-old| > atol + rtol*|old|``, or a NaN/Inf
    appearing); every bitwise change is reported with its numbers whatever
    the tolerance. ``include``/``exclude`` are fnmatch globs on full tensor
    names; ``include`` globs that select nothing from checkpoints that hold
    tensors raise :class:`~ckptdiff.errors.NothingSelected` (a typo must not
    pass as "no change"). ``fail_on`` (``drift``/``change``/``never``)
    defaults to ``drift`` when a manifest is known, else ``change``.
    ``progress(done_bytes, total_bytes)`` is called as bytes are compared.

    ``workers``: threads comparing tensors side by side (default: one per
    core, up to 4, and one when the tensors are small). The report is the
    same for any value.

    ``rank``: also test each changed matrix's delta for a numerical rank of
    at most ``rank`` (cause ``low_rank``, as a merged LoRA leaves); this
    reads those tensors whole a second time, so it is off by default. Every
    changed tensor gets a ``cause`` either way (docs/causes.md).

    ``hash_identical=False``: identical tensors that are not stale get no
    BLAKE3 hash (their rows' ``hash_old``/``hash_new`` are None), which saves
    hashing every unchanged byte when the report will list only what differs
    or is stale (``ckptdiff diff`` does this unless ``--format json --all``).

    Returns:
        The :class:`~ckptdiff.report.DiffReport` every renderer reads.
    """
    with opened(old, new) as (a, b):
        return engine.diff(a, b, load_manifest(manifest), atol, rtol, include, exclude, fail_on, progress,
                           chunk_bytes=chunk_bytes, workers=workers, rank=rank,
                           hash_identical=hash_identical)


__all__ = ["diff"]
