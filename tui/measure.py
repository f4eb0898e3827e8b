"""Put numbers on changed tensors with the real diff engine, a few at a time.

The TUI never computes deltas itself: it hands the engine sub-checkpoints
holding just the tensors it needs, so the numbers on screen are the ones
``ckptdiff diff`` prints, and a worker can stop between batches when the user
moves on to another snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ckptdiff import policy
from ckptdiff.checkpoint import Checkpoint
from ckptdiff.manifest import Manifest
from ckptdiff.report import DiffReport, TensorDiff

#: Roughly how many bytes one batch reads: small enough that cancelling is prompt.
BATCH_BYTES = 16 << 20
BATCH_TENSORS = 16


def _engine_diff():  # imported late: ``import ckptdiff.tui`` should not pull the kernel in
    from ckptdiff.engine import diff
    return diff


def pair_manifest(old: Checkpoint, new: Checkpoint, manifest_path: str | None) -> Manifest | None:
    """The manifest of a two-checkpoint table, as ``ckptdiff diff OLD NEW [--manifest FILE]`` chooses it."""
    explicit = Manifest.load(manifest_path) if manifest_path else None
    return policy.checkpoints_manifest(explicit, old, new)


def measure(old: Checkpoint, new: Checkpoint, names: Sequence[str], manifest: Manifest | None,
            *, atol: float = 0.0, rtol: float = 0.0) -> list[TensorDiff]:
    """The engine's TensorDiff for each of ``names`` (present on either side)."""
    report = diff_checkpoints(old.subset(names), new.subset(names), manifest, atol=atol, rtol=rtol)
    return report.tensors


def diff_checkpoints(old: Checkpoint, new: Checkpoint, manifest: Manifest | None,
                     *, atol: float = 0.0, rtol: float = 0.0) -> DiffReport:
    return _engine_diff()(old, new, manifest=manifest, atol=atol, rtol=rtol)


def refine(rows: Sequence[TensorDiff], old: Checkpoint, new: Checkpoint, manifest: Manifest | None,
           *, atol: float = 0.0, rtol: float = 0.0,
           starting: Callable[[int, int], None] | None = None) -> Iterator[list[TensorDiff]]:
    """Measure the rows the hashes could not settle, one batch of engine rows at a time.

    ``starting(done, total)`` is called before each batch is read. A caller
    stops between batches by not asking for the next one; merging each
    measured row over its hash row (``rows.merge_measured``) gives the
    engine's verdict for every tensor.
    """
    todo = [r for r in rows if r.status in ("pending", "changed")]
    done = 0
    for names in batches(todo, new, old):
        if starting is not None:
            starting(done, len(todo))
        yield measure(old, new, names, manifest, atol=atol, rtol=rtol)
        done += len(names)


def batches(rows: Sequence[TensorDiff], new: Checkpoint, old: Checkpoint) -> Iterator[list[str]]:
    """Names of the rows worth measuring, grouped so each batch reads about BATCH_BYTES."""
    batch: list[str] = []
    size = 0
    for r in rows:
        if r.status not in ("changed", "pending") or r.max_abs_delta is not None:
            continue  # only same-layout pairs have a delta to measure
        ref = new.get(r.name) or old.get(r.name)
        batch.append(r.name)
        size += ref.nbytes if ref is not None else 0
        if size >= BATCH_BYTES or len(batch) >= BATCH_TENSORS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
