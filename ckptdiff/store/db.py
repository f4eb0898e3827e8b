"""The store's SQLite index: schema, format version, connection settings.

Why SQLite: history must survive a writer killed mid-snapshot and two
processes writing at once. WAL mode lets readers (the TUI, ``log``) run
while a snapshot commits; ``BEGIN IMMEDIATE`` plus a busy timeout serialises
writers instead of failing them; a snapshot is one transaction, so it is
either wholly listed or not at all.

The format version lives in the ``meta`` table. A store written by a newer
ckptdiff is refused rather than misread; when the format changes, the
migration of older stores belongs here.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time

from .._version import __version__
from ..errors import CkptError
from .layout import DB_NAME

#: 2: objects may live in pack files (``packs/``), which version 1 readers would report as missing.
FORMAT_VERSION = 2
#: The first format version whose stores may hold packs.
PACKS_VERSION = 2
#: How long a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 120.0
#: Page cache per writing connection, in KiB.
CACHE_KIB = 64 << 10

SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE snapshots (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    parent      TEXT,
    created_at  REAL NOT NULL,
    step        INTEGER,
    tag         TEXT,
    message     TEXT,
    metrics     TEXT NOT NULL DEFAULT '{}',
    manifest    TEXT,
    source      TEXT,
    n_tensors   INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL,
    auxiliary   TEXT
);
CREATE INDEX snapshots_tag ON snapshots(tag);
CREATE INDEX snapshots_step ON snapshots(step);
CREATE TABLE entries (
    seq    INTEGER NOT NULL REFERENCES snapshots(seq) ON DELETE CASCADE,
    pos    INTEGER NOT NULL,
    name   TEXT NOT NULL,
    dtype  TEXT NOT NULL,
    shape  TEXT NOT NULL,
    hash   TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    PRIMARY KEY (seq, name)
) WITHOUT ROWID;
CREATE INDEX entries_hash ON entries(hash);
CREATE TABLE blobs (
    hash        TEXT PRIMARY KEY,
    nbytes      INTEGER NOT NULL,
    stored_size INTEGER NOT NULL
) WITHOUT ROWID;
"""


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the index. ``readonly`` opens immutable (for stores the user cannot write)."""
    if readonly:
        uri = "file:" + _uri_path(path) + "?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                               isolation_level=None)
    else:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA synchronous = FULL")
        # A 200,000-tensor snapshot inserts as many rows into two hash-ordered
        # indexes; with SQLite's default 2 MiB page cache that thrashes (about
        # 2x slower). The cache only grows as pages are touched.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    return conn


def _uri_path(path: str) -> str:
    from urllib.parse import quote
    return quote(os.path.abspath(path))


#: Name prefix of a database being built in ``tmp/`` (``gc`` removes stale ones: they end in ``.part``).
INIT_PREFIX = "ckptdiff.db.init-"


def create(path: str, tmp_dir: str, *, compression: str, level: int) -> bool:
    """Publish a fresh index at ``path``; False when one is already there.

    Built under a temporary name in ``tmp_dir``, then hard-linked to
    ``path``: a link, unlike a rename, fails when the name exists, so of
    several processes creating the same store at once exactly one publishes
    its database and none replaces a database another has already written to.
    """
    tmp = os.path.join(tmp_dir, INIT_PREFIX + os.urandom(6).hex() + ".part")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(SCHEMA)
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                ("format_version", str(FORMAT_VERSION)),
                ("compression", compression),
                ("zstd_level", str(level)),
                ("created_at", repr(time.time())),
                ("created_by", f"ckptdiff {__version__}"),
            ])
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        return _publish(tmp, path)
    finally:
        for leftover in (tmp, tmp + "-journal"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


def _publish(tmp: str, path: str) -> bool:
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    # A filesystem without hard links: an exclusive lock orders the creators instead.
    from .locking import gc_lock
    with gc_lock(os.path.dirname(path), exclusive=True):
        if os.path.exists(path):
            return False
        os.replace(tmp, path)
        return True


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})").fetchall())


def add_auxiliary_column(conn: sqlite3.Connection) -> None:
    """Stores made before snapshots recorded a .pt's training state (``auxiliary``)
    lack the column; a writer adds it, inside its own write transaction. Older
    ckptdiff versions read such a store unchanged (they name their columns)."""
    if not has_column(conn, "snapshots", "auxiliary"):
        conn.execute("ALTER TABLE snapshots ADD COLUMN auxiliary TEXT")


def mark_packed(conn: sqlite3.Connection) -> None:
    """A store that gets its first pack is raised to PACKS_VERSION, inside the
    writer's transaction: an older ckptdiff then says it must be upgraded
    instead of reporting the packed objects as missing. Stores with only
    loose blobs keep version 1, readable by every version."""
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version' AND CAST(value AS INTEGER) < ?",
                 (str(PACKS_VERSION), PACKS_VERSION))


def read_meta(conn: sqlite3.Connection, where: str) -> dict[str, str]:
    """Read and check the ``meta`` table; CkptError for a non-store or a newer format."""
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.DatabaseError as e:
        raise CkptError(f"not a ckptdiff store, or its database is damaged ({e})", where) from None
    meta = dict(rows)
    raw = meta.get("format_version")
    try:
        version = int(raw) if raw is not None else None
    except ValueError:
        version = None
    if version is None:
        raise CkptError("not a ckptdiff store (its database records no format version)", where)
    if version > FORMAT_VERSION:
        raise CkptError(
            f"store format version {version} was written by a newer ckptdiff; this ckptdiff "
            f"({__version__}) reads versions up to {FORMAT_VERSION}. Upgrade ckptdiff to use this store", where)
    if meta.get("compression") not in ("none", "zstd"):
        raise CkptError(f"store uses an unknown compression {meta.get('compression')!r}", where)
    return meta


__all__ = ["DB_NAME", "FORMAT_VERSION", "INIT_PREFIX", "PACKS_VERSION", "add_auxiliary_column", "connect", "create",
           "has_column", "mark_packed", "read_meta"]
