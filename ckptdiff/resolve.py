"""Resolution: what the user typed becomes a :class:`~ckptdiff.checkpoint.Checkpoint`, here and only here.

A spec is a checkpoint file, a sharded directory (or its index file), a
torch.distributed.checkpoint directory, or a store snapshot ``DIR@REF``. File
formats are told apart by content in :mod:`ckptdiff.formats` (a new format
is one reader module there and one line in its sniffer and opener); store
references are opened by :mod:`ckptdiff.store`. Neither knows of the other:
this module is the only one that looks at both, so the engine, the CLI and
the TUI receive open checkpoints and never parse a path themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

from .checkpoint import Checkpoint
from .errors import CkptError
from .localpath import refuse_url
from .manifest import Manifest

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

CheckpointLike = Checkpoint | str | os.PathLike[str]
ManifestLike = Manifest | str | os.PathLike[str] | Mapping[str, "Any"] | None

_NOTHING_AFTER_AT = "nothing after '@': name a snapshot, e.g. DIR@latest, DIR@step:500 or DIR@<tag>"


def split_store_ref(spec: str) -> tuple[str, str] | None:
    """``DIR@REF`` -> (DIR, REF) when DIR is a ckptdiff store; otherwise None.

    A path that itself exists is a path, even if it contains ``@``.
    """
    if "@" not in spec or os.path.exists(spec):
        return None
    base, _, ref = spec.rpartition("@")
    if not base or not ref:
        return None
    from .store import is_store
    if not is_store(base):
        return None
    return base, ref


def store_ref(spec: str, *, bare_means_latest: bool = True) -> tuple[str, str]:
    """``DIR@REF`` -> (DIR, REF) for commands that act on one snapshot (show, export, remove).

    A bare DIR means its latest snapshot where that is harmless
    (``bare_means_latest``); anything else is one clear error.
    """
    from .store import is_store

    if "@" in spec and not is_store(spec):
        base, _, ref = spec.rpartition("@")
        if base and ref.strip():
            return base, ref
        if base:
            raise CkptError(_NOTHING_AFTER_AT, spec)
    if is_store(spec):
        if bare_means_latest:
            return spec, "latest"
        raise CkptError("name the snapshot to remove as DIR@REF (e.g. DIR@latest or DIR@step:500); "
                        "a bare store directory is refused so that a typo cannot delete history", spec)
    raise CkptError("expected DIR@REF naming a snapshot in a store (e.g. runs/store@latest)", spec)


def _check_not_a_bad_ref(spec: str) -> None:
    """Explain a ``DIR@REF`` that cannot name a snapshot, instead of "no such file".

    ``runs@latest`` where ``runs`` is a plain directory, or ``runs/store@``
    with nothing after the ``@``, are almost certainly meant as store refs.
    """
    if "@" not in spec or os.path.lexists(spec):
        return
    base, _, ref = spec.rpartition("@")
    if not base or not os.path.exists(base):
        return
    from .store import is_store
    if not is_store(base):
        raise CkptError(f"is not a ckptdiff store, so {spec!r} names no snapshot "
                        "(DIR@REF needs a store directory made by 'ckptdiff init' or 'ckptdiff snapshot')", base)
    if not ref.strip():
        raise CkptError(_NOTHING_AFTER_AT, spec)


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint file, a sharded directory (or its index file) or a store snapshot ``DIR@REF``.

    Raises:
        CkptError: one line naming the path, for anything that is not a readable checkpoint.
    """
    path = os.fspath(spec)
    refuse_url(path, "checkpoint")
    ref = split_store_ref(path)
    if ref is not None:
        from .store import open_snapshot
        return open_snapshot(*ref)
    _check_not_a_bad_ref(path)
    from .formats import open_checkpoint as open_file
    if os.path.isdir(path):
        from .store import is_store
        if is_store(path):
            raise CkptError("is a ckptdiff store: name a snapshot as DIR@REF (e.g. DIR@latest)", path)
    return open_file(path)


def load_manifest(manifest: ManifestLike) -> Manifest | None:
    """A :class:`Manifest` from a Manifest, a JSON file path or a dict in that format; None stays None."""
    if manifest is None or isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, (str, os.PathLike)):
        return Manifest.load(manifest)
    if isinstance(manifest, Mapping):
        return Manifest.from_dict(dict(manifest), source="<dict>")
    raise TypeError(f"manifest must be a Manifest, a path or a dict, got {type(manifest).__name__}")


@contextmanager
def opened(*specs: CheckpointLike) -> Iterator[list[Checkpoint]]:
    """Open each spec (Checkpoints pass through untouched); close what was opened here on exit."""
    with ExitStack() as stack:
        out: list[Checkpoint] = []
        for spec in specs:
            if isinstance(spec, Checkpoint):
                out.append(spec)
            elif isinstance(spec, (str, os.PathLike)):
                out.append(stack.enter_context(open_checkpoint(spec)))
            else:
                raise TypeError(f"expected a path, a DIR@REF string or a Checkpoint, got {type(spec).__name__}")
        yield out


def check_store(path: str) -> None:
    """Check that ``path`` is a readable store directory, so a wrong path fails before long work starts.

    A single checkpoint or ``DIR@REF`` given where a store's history is meant, a
    missing directory and a damaged snapshot row each get their own one-line error.
    """
    from .store import Store, is_store

    refuse_url(path, "store")
    if not is_store(path):
        if split_store_ref(path) is not None or os.path.isfile(path):
            raise CkptError("is a single checkpoint; give two (OLD NEW) to diff them, "
                            "or a store directory to browse its history", path)
        if not os.path.exists(path):
            raise CkptError("no such store directory", path)
        raise CkptError("not a ckptdiff store (record snapshots with the training hook or "
                        "'ckptdiff snapshot' first)", path)
    with Store.open(path) as s:
        s.list()  # reads every snapshot row: a damaged one fails here, not inside the app


__all__ = ["open_checkpoint", "check_store", "split_store_ref", "store_ref", "load_manifest", "opened", "CheckpointLike",
           "ManifestLike"]
