"""What makes a directory a store, answered without opening it.

Kept apart from the database module so that asking "is this directory a
store?" (which every path given to ``ckptdiff diff`` that is a directory
asks) costs one ``stat``, not importing ``sqlite3`` and the store.
"""

from __future__ import annotations

import os

#: The store's SQLite database; a store is a directory holding one.
DB_NAME = "ckptdiff.db"


def is_store(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a ckptdiff store directory (it holds ``ckptdiff.db``)."""
    return os.path.isfile(os.path.join(os.fspath(path), DB_NAME))


__all__ = ["DB_NAME", "is_store"]
