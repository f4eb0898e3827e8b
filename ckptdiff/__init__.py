"""ckptdiff: tensor-level checkpoint diffs, frozen-layer drift detection and snapshot history.

The public API is re-exported here lazily, so ``import ckptdiff`` stays cheap
(no torch, no textual) and the CLI starts fast.
"""

from __future__ import annotations

from ._version import __version__

_LAZY = {
    "open_checkpoint": ("ckptdiff.resolve", "open_checkpoint"),
    "Checkpoint": ("ckptdiff.checkpoint", "Checkpoint"),
    "TensorRef": ("ckptdiff.checkpoint", "TensorRef"),
    "Manifest": ("ckptdiff.manifest", "Manifest"),
    "CkptError": ("ckptdiff.errors", "CkptError"),
    "diff": ("ckptdiff.api", "diff"),
    "DiffReport": ("ckptdiff.report", "DiffReport"),
    "TensorDiff": ("ckptdiff.report", "TensorDiff"),
    "Store": ("ckptdiff.store", "Store"),
    "track": ("ckptdiff.hook", "track"),
    "audit": ("ckptdiff.hook", "audit"),
    "Tracker": ("ckptdiff.hook", "Tracker"),
    "FrozenDriftError": ("ckptdiff.hook", "FrozenDriftError"),
}

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from .checkpoint import Checkpoint, TensorRef
    from .api import diff
    from .errors import CkptError
    from .manifest import Manifest
    from .report import DiffReport, TensorDiff
    from .resolve import open_checkpoint


def __getattr__(name: str) -> Any:
    try:
        mod_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ckptdiff' has no attribute {name!r}") from None
    import importlib
    value = getattr(importlib.import_module(mod_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY) + ["__version__"]
