"""The policy: status, role, drift and stale of each tensor, decided in one place.

Every view of a pair of checkpoints asks this module for its verdicts: the
engine (``ckptdiff diff`` and :func:`ckptdiff.diff`) after reading bytes,
``log`` and the TUI from store hashes before reading any. Keeping the rules
here is what makes ``ckptdiff tui A B`` agree with ``ckptdiff diff A B``:

* **status** comes from the layouts (added, removed, shape_changed,
  dtype_changed, checked in that order) and, for a same-layout pair, from
  bitwise equality (identical or changed; ``pending`` while unknown).
* **role** comes from the manifest (explicit, else the one embedded in NEW,
  else in OLD), with the training state saved beside the model
  (``Checkpoint.auxiliary``, e.g. a .pt's optimizer) added as buffers;
  ``unknown`` without a manifest.
* **drift**: a frozen tensor that was removed, reshaped, retyped, or changed
  beyond tolerance (``out_of_tolerance``; a changed pair whose elements were
  not measured yet is judged at zero tolerance, as a hash comparison can).
* **stale**: a trainable tensor that is bitwise identical, unless a snapshot
  is compared with itself, where nothing could have moved.

Buffers and unknown roles never drift and are never stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # Layout and Hashed only describe shapes to type checkers

from .manifest import Manifest
from .report import TensorDiff

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

#: Statuses that make a frozen tensor drift whatever the tolerance.
_LAYOUT_DRIFT = frozenset({"removed", "shape_changed", "dtype_changed"})


class Layout(Protocol):
    """What the policy needs of one side of a tensor (a TensorRef, a store Entry)."""

    dtype: str
    shape: Any


class Hashed(Layout, Protocol):
    hash: str | None


# ---------------------------------------------------------------------------
# role
# ---------------------------------------------------------------------------

def roles(manifest: Manifest | None, auxiliary: Iterable[str] = ()) -> Manifest | None:
    """The manifest that decides roles: ``manifest`` plus training state as buffers.

    Equal inputs give the same instance, so its per-name role cache is shared
    by every snapshot of a history that records the same manifest.
    """
    aux = tuple(dict.fromkeys(auxiliary))
    if manifest is None or not aux:
        return manifest
    return _with_auxiliary(manifest, aux)


@lru_cache(maxsize=64)
def _with_auxiliary(manifest: Manifest, auxiliary: tuple[str, ...]) -> Manifest:
    return manifest.with_auxiliary(auxiliary)


def pair_manifest(explicit: Manifest | None, old: Manifest | None, new: Manifest | None,
                  auxiliary: Iterable[str] = ()) -> Manifest | None:
    """The manifest in force for a pair: the explicit one, else NEW's, else OLD's; with training state."""
    chosen = explicit if explicit is not None else new if new is not None else old
    return roles(chosen, auxiliary)


def checkpoints_manifest(explicit: Manifest | None, old: Checkpoint, new: Checkpoint) -> Manifest | None:
    """:func:`pair_manifest` for two open checkpoints: their embedded manifests and training state."""
    return pair_manifest(explicit, old.manifest, new.manifest, tuple(old.auxiliary) + tuple(new.auxiliary))


def role(manifest: Manifest | None, name: str) -> str:
    return manifest.role(name) if manifest is not None else "unknown"


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------

def status(old: Layout | None, new: Layout | None, equal: bool | None) -> str:
    """A tensor's status from its two sides; ``equal`` is bitwise equality (None: not known yet)."""
    if old is None:
        return "added"
    if new is None:
        return "removed"
    if tuple(old.shape) != tuple(new.shape):
        return "shape_changed"
    if old.dtype != new.dtype:
        return "dtype_changed"
    if equal is None:
        return "pending"
    return "identical" if equal else "changed"


def same_layout_status(equal: bool) -> str:
    """The status of a pair already known to share dtype and shape, from bitwise equality."""
    return "identical" if equal else "changed"


def signature_status(old: str | None, new: str | None) -> str:
    """Status between two store signatures, ``"hash|dtype|shape"`` (``Store.signatures``).

    Equal strings mean bitwise-equal tensors of one layout. A signature
    without a layout (a bare hash) can only say ``changed``.
    """
    if old is None and new is None:
        return "absent"
    if old is None:
        return "added"
    if new is None:
        return "removed"
    if old == new:
        return "identical"
    o, n = old.split("|"), new.split("|")
    if len(o) != 3 or len(n) != 3:
        return "changed"
    if o[2] != n[2]:
        return "shape_changed"
    if o[1] != n[1]:
        return "dtype_changed"
    return "changed"


# ---------------------------------------------------------------------------
# drift and stale
# ---------------------------------------------------------------------------

def drifts(role_: str, status_: str, out_of_tolerance: int | None = None) -> bool:
    """A frozen tensor moved: removed, reshaped, retyped, or changed beyond tolerance.

    ``out_of_tolerance`` is the engine's count of elements beyond
    ``atol + rtol*|old|``; None (not measured) judges a change at zero tolerance.
    """
    if role_ != "frozen":
        return False
    if status_ in _LAYOUT_DRIFT:
        return True
    if status_ == "changed":
        return out_of_tolerance is None or out_of_tolerance > 0
    return False


def is_stale(role_: str, status_: str, *, self_compare: bool = False) -> bool:
    """A trainable tensor that never changed (never, when a snapshot is compared with itself)."""
    return role_ == "trainable" and status_ == "identical" and not self_compare


def judge(td: TensorDiff, *, self_compare: bool = False) -> TensorDiff:
    """Set ``td.drift`` and ``td.stale`` from its role, status and ``out_of_tolerance``."""
    td.drift = drifts(td.role, td.status, td.out_of_tolerance)
    td.stale = is_stale(td.role, td.status, self_compare=self_compare)
    return td


# ---------------------------------------------------------------------------
# whole pairs, from hashes alone
# ---------------------------------------------------------------------------

def hash_rows(old: Mapping[str, Hashed], new: Mapping[str, Hashed], manifest: Manifest | None,
              *, self_compare: bool = False) -> list[TensorDiff]:
    """Verdicts of two checkpoints from hashes, dtypes and shapes only (NEW's order, then OLD's leftovers).

    Equal BLAKE3 hashes mean bitwise-equal bytes, so ``identical`` here is
    exact; ``changed`` rows carry no numbers yet and drift at zero
    tolerance until the engine measures them. A side without a known hash (a
    plain file) gives ``pending``.
    """
    out: list[TensorDiff] = []
    names = list(new)
    names += [n for n in old if n not in new]
    for name in names:
        o, n = old.get(name), new.get(name)
        equal = None if o is None or n is None or o.hash is None or n.hash is None else o.hash == n.hash
        ref = n if n is not None else o
        assert ref is not None
        numel = 1
        for d in ref.shape:
            numel *= int(d)
        td = TensorDiff(
            name=name, status=status(o, n, equal), role=role(manifest, name),
            dtype_old=o.dtype if o else None, dtype_new=n.dtype if n else None,
            shape_old=list(o.shape) if o else None, shape_new=list(n.shape) if n else None,
            numel=numel, hash_old=o.hash if o else None, hash_new=n.hash if n else None,
        )
        if td.status == "identical":
            td.max_abs_delta = td.mean_abs_delta = td.rel_l2 = 0.0
            td.changed_elements = 0
        out.append(judge(td, self_compare=self_compare))
    return out


def signature_verdicts(old: Mapping[str, str], new: Mapping[str, str],
                       manifest: Manifest | None) -> tuple[list[str], list[str]]:
    """(drifted, stale) tensor names between two snapshots' signatures, at zero tolerance.

    Only names present in OLD can drift (a tensor that appears is not a
    frozen one moving) or be stale (it must be in both), so only those are
    looked at: a log over hundreds of snapshots stays a hash comparison.
    """
    drifted: list[str] = []
    stale: list[str] = []
    if manifest is None:
        return drifted, stale
    for name, sig in old.items():
        r = manifest.role(name)
        if r != "frozen" and r != "trainable":
            continue
        st = signature_status(sig, new.get(name))
        if drifts(r, st):
            drifted.append(name)
        elif is_stale(r, st):
            stale.append(name)
    return drifted, stale


__all__ = ["roles", "pair_manifest", "checkpoints_manifest", "role", "status", "same_layout_status",
           "signature_status", "drifts",
           "is_stale", "judge", "hash_rows", "signature_verdicts"]
