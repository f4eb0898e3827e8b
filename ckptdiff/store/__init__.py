"""Content-addressed snapshot store (placeholder until the store lands)."""

from __future__ import annotations

import os

from ..checkpoint import Checkpoint
from ..errors import CkptError

DB_NAME = "ckptdiff.db"


def is_store(path: str) -> bool:
    """True when ``path`` is a ckptdiff store directory."""
    return os.path.isfile(os.path.join(path, DB_NAME))


def open_snapshot(store_dir: str, ref: str) -> Checkpoint:
    raise CkptError("snapshot stores are not implemented yet", f"{store_dir}@{ref}")
