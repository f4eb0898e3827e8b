"""The Store: a directory of content-addressed blobs plus a SQLite history.

Write path (``snapshot``): every tensor's bytes become a blob first (temp
file, fsync, rename; bytes already stored are skipped by hash), tensors
under 64 KiB in this writer's own pack file (published, index last, before
the commit), then one ``BEGIN IMMEDIATE`` transaction checks that every blob
the snapshot needs is stored and inserts the snapshot and its entries. Until
that commit nothing is listed, so a writer killed at any instant leaves
history as it was.

``gc`` deletes unreferenced blobs and repacks packs holding any while
holding the same write lock, and a snapshot re-checks its blobs inside its
own transaction (rewriting any that a concurrent ``gc`` removed), so the two
can run from different processes.

One Store object may be used from several threads (the training hook
writes from a background thread): the connection is shared under a lock and
blob I/O happens outside it.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from blake3 import blake3

from ..checkpoint import Checkpoint, TensorRef
from ..errors import CkptError, FormatError
from ..localpath import refuse_url
from ..manifest import Manifest
from ..progress import Meter, ProgressFn
from ..textsafe import printable
from . import compress as compress_mod
from . import db, refs
from .blobs import BlobDir, put_all, store_os_error
from .history import LogRow, build_log, effective_manifest
from .layout import is_store
from .locking import LOCK_NAME, gc_lock
from .model import BadBlob, Entry, GcResult, Metric, SnapshotInfo, VerifyResult
from .packs import PACK_DIR, SMALL_OBJECT_BYTES
from .rows import (auxiliary_to_json, check_metrics, entry_from_row, info_from_row, manifest_to_json, new_id,
                   snap_cols)

#: Steps are stored as SQLite 64-bit integers.
MAX_STEP = 2**63

#: Temp files older than this are leftovers of a killed writer; ``gc`` removes them.
STALE_TEMP_S = 3600.0



def _root(path: str | os.PathLike[str]) -> str:
    """A store path as given, refused when it cannot name a local directory."""
    root = os.fspath(path)
    if not root.strip():
        raise CkptError("the store directory name is empty")
    refuse_url(root, "store")
    return root


#: What a store directory holds while one or more processes are creating it
#: (before its database is published): an empty ``blobs/``, ``tmp/`` holding
#: only databases being built, the empty lock file.
_SKELETON = {"blobs", "tmp", LOCK_NAME}


def _being_created(root: str, entries: list[str]) -> bool:
    """True when ``root`` holds nothing but another creator's skeleton."""
    if not set(entries) <= _SKELETON:
        return False
    try:
        if "blobs" in entries and os.listdir(os.path.join(root, "blobs")):
            return False
        building = os.listdir(os.path.join(root, "tmp")) if "tmp" in entries else []
        if not all(n.startswith(db.INIT_PREFIX) for n in building):
            return False
        return LOCK_NAME not in entries or os.path.getsize(os.path.join(root, LOCK_NAME)) == 0
    except OSError:  # a file where a directory should be, or the reverse
        return False


def _create(root: str, compress: bool) -> bool:
    """Make a store at ``root``; False when another process published one there first.

    Safe against any number of concurrent creators: the skeleton (``blobs/``,
    ``tmp/``, the lock file) is made idempotently, and the database is built
    under a temporary name and published by :func:`db.create`, which never
    replaces one already there. A directory holding only another creator's
    skeleton counts as empty.
    """
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise CkptError("exists and is not a directory", root)
        try:
            entries = os.listdir(root)
        except OSError as e:
            raise store_os_error(e, root, "create the store") from None
        if entries and not _being_created(root, entries):
            if is_store(root):  # another process finished creating it meanwhile
                return False
            raise CkptError("directory is not empty and is not a ckptdiff store; "
                            "choose a new or empty directory", root)
    try:
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
        with open(os.path.join(root, LOCK_NAME), "ab"):
            pass
        return db.create(os.path.join(root, db.DB_NAME), os.path.join(root, "tmp"),
                         compression="zstd" if compress else "none", level=compress_mod.DEFAULT_LEVEL)
    except OSError as e:
        raise store_os_error(e, root, "create the store") from None
    except sqlite3.Error as e:
        raise _sql_error(e, root, "create the store") from None


def _sql_error(e: sqlite3.Error, root: str, action: str) -> CkptError:
    msg = str(e)
    low = msg.lower()
    if "readonly" in low or "read-only" in low:
        return CkptError(f"store is read-only; cannot {action}", root)
    if "disk is full" in low or "database or disk is full" in low:
        return CkptError(f"disk full while {action}; the store was left unchanged", root)
    if "locked" in low or "busy" in low:
        return CkptError(f"store is busy: another process held its lock for over {db.BUSY_TIMEOUT_S:.0f} s "
                         f"while {action}", root)
    return CkptError(f"{action} failed: database error ({msg})", root)


class Store:
    """A snapshot store directory. Create with :meth:`init`, open with :meth:`open`."""

    def __init__(self, root: str, conn: sqlite3.Connection, meta: dict[str, str], readonly: bool) -> None:
        self.root = root
        self._conn: sqlite3.Connection | None = conn
        self.meta = meta
        self.readonly = readonly
        self.compressed = meta["compression"] == "zstd"
        raw_level = meta.get("zstd_level", "")
        level = int(raw_level) if raw_level.isdigit() and 1 <= int(raw_level) <= 19 else compress_mod.DEFAULT_LEVEL
        self.blobs = BlobDir(root, compressed=self.compressed, level=level)
        self._lock = threading.RLock()
        #: Whether this store's snapshots table has the ``auxiliary`` column (a
        #: writer adds it; see db.add_auxiliary_column).
        self._has_aux = db.has_column(conn, "snapshots", "auxiliary")

    # -- lifecycle ------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike[str], compress: bool = False) -> Store:
        """Create a store at ``path`` (a new or empty directory); refuses an existing store."""
        root = _root(path)
        if is_store(root) or not _create(root, compress):
            raise CkptError("is already a ckptdiff store", root)
        return cls.open(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = False, compress: bool = False) -> Store:
        """Open an existing store; with ``create``, make one if ``path`` is missing or empty.

        Any number of processes may ``open(create=True)`` the same new path at
        once: exactly one database is published and all of them open it
        (``compress`` applies only if this call is the one that creates it).
        """
        root = _root(path)
        if not is_store(root):
            if create:
                _create(root, compress)  # refuses files and non-empty directories itself
            elif not os.path.exists(root):
                raise CkptError("no such store (create one with 'ckptdiff init DIR')", root)
            else:
                raise CkptError(f"not a ckptdiff store (no {db.DB_NAME}; create one with 'ckptdiff init DIR')",
                                root)
        dbpath = os.path.join(root, db.DB_NAME)
        readonly = not (os.access(root, os.W_OK) and os.access(dbpath, os.W_OK))
        try:
            conn = db.connect(dbpath, readonly=readonly)
        except sqlite3.Error as e:
            raise CkptError(f"cannot open the store database ({e})", root) from None
        try:
            meta = db.read_meta(conn, root)
        except BaseException:
            conn.close()
            raise
        return cls(root, conn, meta, readonly)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.root!r}, compressed={self.compressed})"

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CkptError("the store is closed", self.root)
        return self._conn

    # -- database helpers -----------------------------------------------------------
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise _sql_error(e, self.root, "reading the store") from None

    @contextmanager
    def _write_txn(self, action: str) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise CkptError(f"store is read-only; cannot {action}", self.root)
        with self._lock:
            conn = self.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise _sql_error(e, self.root, action) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise _sql_error(e, self.root, action) from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @property
    def _cols(self) -> str:
        return snap_cols(self._has_aux)

    def _info(self, row: tuple[Any, ...]) -> SnapshotInfo:
        return info_from_row(row, self.root)

    def _info_at(self, seq: int) -> SnapshotInfo:
        return self._info(self._query(f"SELECT {self._cols} FROM snapshots WHERE seq = ?", (seq,))[0])

    def _rows(self) -> list[tuple[Any, ...]]:
        return self._query(f"SELECT {self._cols} FROM snapshots ORDER BY seq")

    def _ref_rows(self, conn: sqlite3.Connection | None = None) -> list[tuple[int, refs.RefRow]]:
        sql = "SELECT seq, id, tag, step FROM snapshots ORDER BY seq"
        rows = conn.execute(sql).fetchall() if conn is not None else self._query(sql)
        return [(r[0], refs.RefRow(r[1], r[2], r[3])) for r in rows]

    def _resolve_seq(self, ref: str, conn: sqlite3.Connection | None = None) -> tuple[int, str]:
        # The two forms the hook uses on every snapshot (``latest`` and exact
        # ids) are answered by the index, so writing stays O(1) in history
        # length; every other form goes through the full resolver.
        key = str(ref).strip()
        fast = None
        if key == "latest":
            fast = "SELECT seq, id FROM snapshots ORDER BY seq DESC LIMIT 1", ()
        elif refs.looks_like_full_id(key):
            fast = "SELECT seq, id FROM snapshots WHERE id = ?", (key,)
        if fast is not None:
            hit = conn.execute(*fast).fetchall() if conn is not None else self._query(*fast)
            if hit:
                return int(hit[0][0]), str(hit[0][1])
        rows = self._ref_rows(conn)
        i = refs.resolve(str(ref), [r for _, r in rows], f"{self.root}@{ref}")
        return rows[i][0], rows[i][1].id

    # -- reading history ------------------------------------------------------------
    def list(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first."""
        return [self._info(r) for r in self._rows()]

    def resolve(self, ref: str) -> SnapshotInfo:
        """The snapshot a ref names (see :mod:`ckptdiff.store.refs` for the forms)."""
        return self._info_at(self._resolve_seq(ref)[0])

    def entries(self, ref: str) -> dict[str, Entry]:
        """Name -> Entry of a snapshot, in its tensor order; reads no blob."""
        seq, sid = self._resolve_seq(ref)
        return self._entries_of(seq, f"{self.root}@{sid}")

    def _entries_of(self, seq: int, where: str) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for name, dt, shape, h, nbytes in self._query(
                "SELECT name, dtype, shape, hash, nbytes FROM entries WHERE seq = ? ORDER BY pos", (seq,)):
            out[name] = entry_from_row(name, dt, shape, h, nbytes, where)
        return out

    def effective_manifest(self, ref: str) -> Manifest | None:
        """The snapshot's own manifest, else its nearest ancestor's."""
        info = self.resolve(ref)
        return effective_manifest(info.id, {i.id: i for i in self.list()})

    def open_snapshot(self, ref: str) -> Checkpoint:
        """A snapshot as a regular Checkpoint (format ``store``, path ``DIR@ID``).

        Each TensorRef carries its hash (so equal tensors compare without a
        read) and streams its blob, re-hashing it on the way.
        """
        info = self.resolve(ref)
        seq = self._resolve_seq(info.id)[0]
        where = f"{self.root}@{info.id}"
        tensors: dict[str, TensorRef] = {}
        for name, e in self._entries_of(seq, where).items():
            tensors[name] = TensorRef(name, e.dtype, e.shape, pieces=_blob_reader(self.blobs, e, where),
                                      hash=e.hash, source=where)
        metadata: dict[str, Any] = {
            "snapshot": info.id, "parent": info.parent, "created_at": info.created_at, "step": info.step,
            "tag": info.tag, "message": info.message, "metrics": dict(info.metrics), "source": info.source,
            "store": self.root,
        }
        manifest = effective_manifest(info.id, {i.id: i for i in self.list()})
        return Checkpoint(where, "store", tensors, metadata, manifest, auxiliary=info.auxiliary)

    def log(self) -> list[LogRow]:
        """History with per-snapshot change counts and drift vs the first snapshot.

        Tensors are compared by hash, dtype and shape (:meth:`signatures`), as
        ``diff`` and the TUI do: the same bytes reshaped or re-typed are a change.
        """
        return build_log(self.list(), self.signatures())

    def signatures(self) -> dict[str, dict[str, str]]:
        """Every snapshot's ``name -> "hash|dtype|shape"`` in one query (snapshot order, tensor order).

        Equal strings mean bitwise-equal tensors of one layout, which is all a
        history view needs to tell changed, drifted and stale tensors apart.
        The values are for comparing only: unlike :meth:`entries` they are not
        validated (no file is named by them), which makes a 200 x 1,000 store
        ~10x faster to summarise. Equal signatures share one string.
        """
        out: dict[str, dict[str, str]] = {r[0]: {} for r in self._query("SELECT id FROM snapshots ORDER BY seq")}
        shapes: dict[str, str] = {}
        sigs: dict[tuple[str, str, str], str] = {}
        names: dict[str, str] = {}
        for sid, name, h, dt, shape in self._query(
                "SELECT s.id, e.name, e.hash, e.dtype, e.shape FROM entries e JOIN snapshots s ON s.seq = e.seq "
                "ORDER BY e.seq, e.pos"):
            canon = shapes.get(shape)
            if canon is None:
                canon = shapes[shape] = _shape_text(shape)
            key = (h, dt, canon)
            sig = sigs.get(key)
            if sig is None:
                sig = sigs[key] = f"{h}|{dt}|{canon}"
            out[sid][names.setdefault(name, name)] = sig
        return out

    def disk_usage(self) -> int:
        """Bytes of blob, pack and pack index files on disk (what the tensors cost, after dedupe and compression)."""
        return self.blobs.usage()

    def reclaimable_bytes(self) -> int:
        """Bytes on disk of blobs no snapshot references (what ``gc`` would free)."""
        referenced = {r[0] for r in self._query("SELECT DISTINCT hash FROM entries")}
        return sum(size for h, size in self.blobs.scan() if h not in referenced)

    # -- writing --------------------------------------------------------------------
    def snapshot(
        self,
        tensors: Mapping[str, TensorRef],
        *,
        step: int | None = None,
        tag: str | None = None,
        message: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        manifest: Manifest | None = None,
        source: str | None = None,
        parent: str | None = "latest",
        inherit_from: str | None = None,
        auxiliary: Sequence[str] | None = None,
        progress: ProgressFn | None = None,
    ) -> str:
        """Record ``tensors`` as a new snapshot; returns its id.

        Names absent from ``tensors`` are copied (by hash) from
        ``inherit_from``, so a caller that knows what changed writes only that.
        ``auxiliary`` names the training state saved beside the model (see
        ``Checkpoint.auxiliary``); by default it is the checkpoint's own when
        ``tensors`` is a Checkpoint, else ``inherit_from``'s. A snapshot opened
        later carries it, so a diff between snapshots treats optimizer state as
        buffers, as a diff of the original files does. ``progress(done, total)``
        is called with bytes hashed and written (the store draws nothing).
        """
        if self.readonly:
            raise CkptError("store is read-only; cannot write a snapshot", self.root)
        if step is not None:
            try:
                step = operator.index(step)
            except TypeError:
                raise CkptError(f"step must be an integer, got {step!r}") from None
            if not 0 <= step < MAX_STEP:
                # SQLite stores 64-bit integers; a negative step is a bug in the caller.
                raise CkptError(f"step must be a whole number from 0 to {MAX_STEP - 1}, got {step}")
        if tag is not None:
            refs.check_tag(tag)
        mets = check_metrics(metrics)
        check_names(tensors)
        _check_text("tag, message or source", [x for x in (tag, message, source) if x is not None])
        base: dict[str, Entry] = {}
        if inherit_from is not None:
            # Resolved once: entries and training state come from the same snapshot
            # even if another writer commits meanwhile (``latest`` would move).
            base_seq, base_id = self._resolve_seq(inherit_from)
            base = self._entries_of(base_seq, f"{self.root}@{base_id}")
        if auxiliary is None:
            if isinstance(tensors, Checkpoint):
                auxiliary = tensors.auxiliary
            elif inherit_from is not None:
                auxiliary = self._info_at(base_seq).auxiliary
        aux = tuple(dict.fromkeys(str(a) for a in auxiliary or ()))
        # A plain dict from here on: a Mapping's items() costs a lookup per
        # name, which shows at 200,000 tensors.
        tensors = dict(tensors.tensors if isinstance(tensors, Checkpoint) else tensors)
        try:
            with gc_lock(self.root, exclusive=False), _collector_paused(len(tensors)):
                return self._snapshot(tensors, base, step=step, tag=tag, message=message, metrics=mets,
                                      manifest=manifest, source=source, parent=parent,
                                      inherit_from=inherit_from, auxiliary=aux, progress=progress)
        except OSError as e:
            raise store_os_error(e, self.root, "writing a snapshot") from None

    def _snapshot(self, tensors: dict[str, TensorRef], base: dict[str, Entry], *, step: int | None,
                  tag: str | None, message: str | None, metrics: dict[str, Metric], manifest: Manifest | None,
                  source: str | None, parent: str | None, inherit_from: str | None, auxiliary: tuple[str, ...],
                  progress: ProgressFn | None) -> str:
        by_hash: dict[str, TensorRef] = {}
        written: list[str] = []
        new_entries: dict[str, Entry] = {}
        total = sum(t.nbytes for t in tensors.values())
        pack = self.blobs.new_pack()
        self.blobs.packs.refresh()  # under the shared gc lock: what we dedupe against stays

        lock = threading.Lock()

        def put(t: TensorRef, advance: Any) -> str:
            h, created = self.blobs.put(t, advance)
            with lock:
                if created:
                    written.append(h)
                by_hash[h] = t
            return h

        try:
            meter = Meter(progress, total)
            # Small tensors go, one after another, into this writer's pack (a
            # thread per tiny tensor would cost more than the tensor); big ones
            # become loose files, several at once.
            small = {n: t for n, t in tensors.items() if t.nbytes < SMALL_OBJECT_BYTES}
            if len(small) >= LIST_LOOSE_MIN:  # one listing of blobs/, not a stat per small tensor
                pack.loose = {h for h, _ in self.blobs.scan_loose()}
            hashes: dict[str, str] = {}
            put_packed = self.blobs.put_packed
            for n, t in small.items():
                h = hashes[n] = put_packed(t, pack)
                by_hash[h] = t
            meter.sink(sum(t.nbytes for t in small.values()))
            big = {n: t for n, t in tensors.items() if n not in small}
            hashes.update(put_all(put, big, meter.sink, total - sum(t.nbytes for t in small.values())))
            for name, t in tensors.items():
                new_entries[name] = Entry(name, t.dtype, tuple(t.shape), hashes[name], t.nbytes)
            meter.finish()
            if pack.publish():
                self.blobs.packs.add_published(pack)
            if written:
                self.blobs.sync()
            return self._commit(base, new_entries, by_hash, put, step=step, tag=tag, message=message,
                                metrics=metrics, manifest=manifest, source=source, parent=parent,
                                inherit_from=inherit_from, auxiliary=auxiliary)
        except BaseException:
            # Whatever went wrong (OSError becomes one line in snapshot()), the
            # blobs and the pack this call created and nothing references are removed.
            pack.abort()
            self._discard(written, pack.name if pack.published else None)
            raise

    def _commit(self, base: dict[str, Entry], new_entries: dict[str, Entry], by_hash: dict[str, TensorRef],
                put: Callable[[TensorRef, Any], str], *, step: int | None, tag: str | None,
                message: str | None, metrics: dict[str, Metric], manifest: Manifest | None,
                source: str | None, parent: str | None, inherit_from: str | None,
                auxiliary: tuple[str, ...]) -> str:
        """Make the snapshot visible in one transaction, rewriting blobs a concurrent gc took."""
        final: list[Entry] = [new_entries.get(n, e) for n, e in base.items()]
        final += [e for n, e in new_entries.items() if n not in base]
        n_bytes = sum(e.nbytes for e in final)
        man_json = manifest_to_json(manifest)

        for _attempt in range(5):
            try:
                with self._write_txn("write a snapshot") as conn:
                    missing = sorted(set(self.blobs.missing({e.hash for e in final})))
                    if missing:
                        raise _Missing(missing)
                    if parent == "latest":
                        row = conn.execute("SELECT id FROM snapshots ORDER BY seq DESC LIMIT 1").fetchone()
                        parent_id = row[0] if row else None
                    elif parent is None:
                        parent_id = None
                    else:
                        parent_id = self._resolve_seq(parent, conn)[1]
                    conn.executemany(
                        "INSERT OR IGNORE INTO blobs(hash, nbytes, stored_size) VALUES (?, ?, ?)",
                        [(h, by_hash[h].nbytes, self.blobs.stored_size(h)) for h in by_hash])
                    sid = new_id()
                    if not self._has_aux:
                        db.add_auxiliary_column(conn)
                    if self.blobs.packs.packs:
                        db.mark_packed(conn)
                    cur = conn.execute(
                        "INSERT INTO snapshots(id, parent, created_at, step, tag, message, metrics, manifest, "
                        "source, n_tensors, total_bytes, auxiliary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (sid, parent_id, time.time(), step, tag, message, json.dumps(metrics), man_json, source,
                         len(final), n_bytes, auxiliary_to_json(auxiliary)))
                    seq = cur.lastrowid
                    shapes: dict[tuple[int, ...], str] = {}
                    conn.executemany(
                        "INSERT INTO entries(seq, pos, name, dtype, shape, hash, nbytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(seq, i, e.name, e.dtype, shapes.get(e.shape) or shapes.setdefault(e.shape, json.dumps(
                            list(e.shape))), e.hash, e.nbytes) for i, e in enumerate(final)])
                self._has_aux = True
                return sid
            except _Missing as m:
                # A concurrent gc removed a blob between our write and our commit: write it again.
                lost = [h for h in m.hashes if h not in by_hash]
                if lost:
                    raise CkptError(f"{len(lost)} blob(s) of snapshot {inherit_from!r} vanished while "
                                    "writing (was it removed and garbage-collected meanwhile?)", self.root) from None
                again = self.blobs.new_pack()
                try:
                    for h in m.hashes:
                        t = by_hash[h]
                        if t.nbytes < SMALL_OBJECT_BYTES:
                            self.blobs.put_packed(t, again)
                        else:
                            put(t, lambda _n: None)
                    if again.publish():
                        self.blobs.packs.add_published(again)
                finally:
                    again.abort()
                self.blobs.sync()
        raise CkptError("could not commit the snapshot: its blobs kept being garbage-collected", self.root)

    def _discard(self, written: list[str], pack: str | None = None) -> None:
        """Best effort: remove blobs (and the pack) this call created that no snapshot references.

        Done under the write lock so a concurrent writer that deduplicated
        against one of them either committed first (we keep it) or will find it
        missing in its own commit check and rewrite it. A pack is dropped only
        if none of its objects is referenced; otherwise gc repacks it.
        """
        if (not written and pack is None) or self.readonly:
            return
        try:
            with self._write_txn("clean up after a failed snapshot") as conn:
                def used(h: str) -> bool:
                    return conn.execute("SELECT 1 FROM entries WHERE hash = ? LIMIT 1", (h,)).fetchone() is not None

                for h in set(written):
                    if not used(h):
                        try:
                            self.blobs.remove(h)
                        except OSError:
                            pass
                if pack is not None and not any(used(r[0]) for r in self.blobs.packs.packs.get(pack, [])):
                    try:
                        self.blobs.drop_pack(pack)
                    except OSError:
                        pass
        except CkptError:
            pass

    def remove(self, ref: str) -> SnapshotInfo:
        """Delete a snapshot from history (its blobs stay until ``gc``).

        Children are re-parented to its parent and inherit its manifest when
        they have none, so removing a snapshot never changes another's roles.
        """
        with self._write_txn("remove a snapshot") as conn:
            seq, _sid = self._resolve_seq(ref, conn)
            return self._remove_locked(conn, seq)

    def _remove_locked(self, conn: sqlite3.Connection, seq: int) -> SnapshotInfo:
        info = self._info(conn.execute(f"SELECT {self._cols} FROM snapshots WHERE seq = ?", (seq,)).fetchone())
        if info.manifest is not None:
            conn.execute("UPDATE snapshots SET manifest = ? WHERE parent = ? AND manifest IS NULL",
                         (manifest_to_json(info.manifest), info.id))
        conn.execute("UPDATE snapshots SET parent = ? WHERE parent = ?", (info.parent, info.id))
        conn.execute("DELETE FROM entries WHERE seq = ?", (seq,))
        conn.execute("DELETE FROM snapshots WHERE seq = ?", (seq,))
        return info

    def gc(self, keep_last: int | None = None) -> GcResult:
        """Free unreferenced blobs (repacking packs that hold any); with ``keep_last``, first drop
        older untagged snapshots.

        ``keep_last=N`` keeps the newest N snapshots and every tagged one.
        Referenced blobs are never removed.
        """
        res = GcResult()
        if keep_last is not None:
            if keep_last < 0:
                raise CkptError(f"--keep-last must be 0 or more, got {keep_last}")
            with self._write_txn("remove old snapshots") as conn:
                rows = self._ref_rows(conn)
                old = rows[:len(rows) - keep_last] if keep_last else rows
                for seq, r in old:
                    if r.tag is None:
                        self._remove_locked(conn, seq)
                        res.snapshots_removed.append(r.id)
        try:
            with gc_lock(self.root, exclusive=True), self._write_txn("collect garbage") as conn:
                referenced = {r[0] for r in conn.execute("SELECT DISTINCT hash FROM entries")}
                for h, _size_on_disk in list(self.blobs.scan_loose()):
                    if h in referenced:
                        res.blobs_kept += 1
                        continue
                    res.bytes_freed += self.blobs.remove(h)
                    res.blobs_removed += 1
                dropped, freed, kept = self.blobs.repack(referenced)
                res.blobs_removed += dropped
                res.bytes_freed += freed
                res.blobs_kept += kept
                conn.execute("DELETE FROM blobs WHERE hash NOT IN (SELECT hash FROM entries)")
                for p in self.blobs.stale_temp(STALE_TEMP_S):
                    try:
                        os.unlink(p)
                        res.temp_files_removed += 1
                    except FileNotFoundError:
                        pass
                self.blobs.sync()
        except OSError as e:
            raise store_os_error(e, self.root, "collect garbage") from None
        return res

    # -- checking and exporting -----------------------------------------------------
    def verify(self, progress: ProgressFn | None = None) -> VerifyResult:
        """Re-hash every referenced blob and check every entry; ``progress(done, total)`` in bytes."""
        res = VerifyResult()
        try:
            with self._lock:
                check = self.conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as e:
            check = [(f"{e}",)]
        if [r[0] for r in check] != ["ok"]:
            res.errors.append("database integrity check failed: " + "; ".join(str(r[0]) for r in check[:5]))
        need: dict[str, int] = {}
        users: dict[str, list[tuple[str, str]]] = {}
        rows = self._query("SELECT s.id, e.name, e.dtype, e.shape, e.hash, e.nbytes FROM entries e "
                           "JOIN snapshots s ON s.seq = e.seq ORDER BY s.seq, e.pos")
        res.snapshots = len(self._query("SELECT 1 FROM snapshots"))
        aux_col = "auxiliary" if self._has_aux else "NULL"
        for sid, manifest, metrics, aux in self._query(
                f"SELECT id, manifest, metrics, {aux_col} FROM snapshots ORDER BY seq"):
            res.errors += _metadata_problems(sid, manifest, metrics, aux)
        for sid, name, dt, shape, h, nbytes in rows:
            try:
                e = entry_from_row(name, dt, shape, h, nbytes, f"{self.root}@{sid}")
            except CkptError as err:
                res.errors.append(f"snapshot {sid}, tensor {name!r}: {err.message}")
                continue
            users.setdefault(e.hash, []).append((sid, name))
            if need.setdefault(e.hash, e.nbytes) != e.nbytes:
                res.errors.append(f"snapshot {sid}, tensor {name!r}: blob {e.hash[:16]}… recorded with "
                                  "two different sizes")
        total = sum(need.values())
        meter = Meter(progress, total)
        bad, pack_problems = self.blobs.check_all(need, meter.sink)
        res.errors += pack_problems
        res.blobs_checked = len(need)
        res.bytes_checked = total
        res.bad += [BadBlob(h, bad[h], users[h]) for h in need if h in bad]
        meter.finish()
        res.unreferenced = sum(1 for h, _ in self.blobs.scan() if h not in need)
        return res

    def _owns(self, path: str) -> bool:
        return _owned_by(path, self.root)

    def export(self, ref: str, out_path: str | os.PathLike[str], format: str = "safetensors", *,
               overwrite: bool = False, progress: ProgressFn | None = None) -> SnapshotInfo:
        """Write a snapshot as a plain .safetensors or .pt file, bit-identical to what was stored.

        ``progress(done, total)`` is called with bytes written (the store draws nothing).
        """
        from .export import FORMATS, write_pt, write_safetensors

        out = os.fspath(out_path)
        if format not in FORMATS:
            raise CkptError(f"unknown export format {format!r} (choose {' or '.join(FORMATS)})")
        if os.path.isdir(out):
            raise CkptError("is a directory; give a file name to export to", out)
        if self._owns(out):
            raise CkptError("is one of the store's own files; export outside the store's database, blobs/, "
                            "packs/ and tmp/", out)
        if os.path.exists(out) and not overwrite:
            raise CkptError("already exists (pass --force to overwrite)", out)
        parent_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent_dir):
            raise CkptError("the folder to export into does not exist", out)
        info = self.resolve(ref)
        ckpt = self.open_snapshot(info.id)
        meta = {"ckptdiff.snapshot": info.id, "ckptdiff.store": os.path.abspath(self.root)}
        if info.step is not None:
            meta["ckptdiff.step"] = str(info.step)
        if info.tag is not None:
            meta["ckptdiff.tag"] = info.tag
        if ckpt.manifest is not None:
            meta["ckptdiff.manifest"] = json.dumps(ckpt.manifest.to_dict())
        try:
            meter = Meter(progress, ckpt.total_bytes)
            if format == "safetensors":
                write_safetensors(ckpt, out, meta, meter.sink)
            else:
                write_pt(ckpt, out, meter.sink)
            meter.finish()
        except OSError as e:
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise CkptError("disk full while exporting; nothing was written", out) from None
            raise CkptError(f"cannot write the export: {e.strerror or e}", out) from None
        return info


def _metadata_problems(sid: str, manifest: Any, metrics: Any, auxiliary: Any = None) -> list[str]:
    """What ``verify`` says about a snapshot row whose manifest, metrics or auxiliary JSON is damaged.

    Reading such a snapshot fails (or, for metrics and auxiliary, shows
    none), so a check that only re-hashed blobs would call a store "ok" that
    ``log`` cannot list or that silently forgot a checkpoint's training state.
    """
    out = []
    if manifest is not None:
        try:
            d = json.loads(manifest)
            if not isinstance(d, dict):
                raise ValueError
            Manifest(tuple(d.get("trainable", ())), tuple(d.get("frozen", ())), tuple(d.get("buffers", ())))
        except (ValueError, TypeError, AttributeError, RecursionError):
            out.append(f"snapshot {sid}: its manifest in the database is damaged (not the JSON ckptdiff wrote)")
    if metrics:
        try:
            ok = isinstance(json.loads(metrics), dict)
        except (ValueError, TypeError, RecursionError):
            ok = False
        if not ok:
            out.append(f"snapshot {sid}: its metrics in the database are damaged (not a JSON object)")
    if auxiliary is not None:
        try:
            v = json.loads(auxiliary) if isinstance(auxiliary, str) else None
        except (ValueError, RecursionError):
            v = None
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            out.append(f"snapshot {sid}: its training-state names (auxiliary) in the database are damaged "
                       "(not a JSON list of strings)")
    return out


def _owned_by(path: str, root: str) -> bool:
    """True for ``root``'s database (and its -wal/-shm), lock file, and anything under blobs/, packs/ or tmp/."""
    real = os.path.realpath(path)
    top = os.path.realpath(root)
    own = {os.path.join(top, n) for n in (db.DB_NAME, db.DB_NAME + "-wal", db.DB_NAME + "-shm", LOCK_NAME)}
    return real in own or any(_under(real, os.path.join(top, d)) for d in ("blobs", PACK_DIR, "tmp"))


def owning_store(path: str | os.PathLike[str]) -> str | None:
    """The store whose own files ``path`` is one of, or None.

    Writers of user files (``export``, ``diff -o``) check this first: replacing
    ``ckptdiff.db`` or a blob with a report would destroy the history.
    """
    real = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(real)
    for cand in (parent, os.path.dirname(parent)):
        if is_store(cand) and _owned_by(real, cand):
            return cand
    return None


def _under(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


class _Missing(Exception):
    def __init__(self, hashes: list[str]) -> None:
        super().__init__(f"{len(hashes)} blobs missing")
        self.hashes = hashes


#: With at least this many small tensors, a snapshot lists blobs/ once (for
#: dedupe against loose blobs of older stores) instead of a stat per tensor.
LIST_LOOSE_MIN = 1_000

#: Snapshots of at least this many tensors pause Python's cyclic garbage collector.
PAUSE_GC_TENSORS = 10_000


@contextmanager
def _collector_paused(n_tensors: int) -> Iterator[None]:
    """Pause the cyclic garbage collector while a huge snapshot allocates its rows.

    A 200,000-tensor snapshot allocates a million small objects, none of them
    cyclic garbage, and each full collection walks them all again: ~20% of the
    snapshot's CPU. Restored on exit (and left alone if the caller had
    disabled it).
    """
    import gc

    if n_tensors < PAUSE_GC_TENSORS or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def check_names(tensors: Iterable[str]) -> None:
    """CkptError unless every tensor name can be stored (see _check_text)."""
    _check_text("tensor name", tensors)


def _check_text(what: str, texts: Iterable[str]) -> None:
    """SQLite stores text as UTF-8: a lone surrogate (a safetensors header can
    spell one as an escape) is refused as bad input, before anything is written."""
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise CkptError(f"{what} {printable(t)} is not valid Unicode (it holds a lone surrogate), "
                            "so the store cannot record it") from None


def _shape_text(raw: Any) -> str:
    """A stored shape (JSON text) as ``"3,4"``, the form the TUI compares; damaged text stays as it is."""
    try:
        dims = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return str(raw)
    if isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return ",".join(str(d) for d in dims)
    return str(raw)


def _blob_reader(blobs: BlobDir, e: Entry, where: str):  # type: ignore[no-untyped-def]
    def pieces() -> Iterator[bytes]:
        hasher = blake3()
        for piece in blobs.pieces(e.hash, e.nbytes, where):
            hasher.update(piece)
            yield piece
        if hasher.hexdigest() != e.hash:
            raise FormatError(f"tensor {e.name!r}: its blob {e.hash[:16]}… is corrupt (run 'ckptdiff verify')",
                              where)
    return pieces


def open_snapshot(store_dir: str | os.PathLike[str], ref: str) -> Checkpoint:
    """Open ``DIR@REF`` as a Checkpoint; the store is closed again before returning."""
    with Store.open(store_dir) as s:
        return s.open_snapshot(ref)


__all__ = ["Store", "is_store", "open_snapshot", "owning_store"]
