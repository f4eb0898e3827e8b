"""Content-addressed blob files: each distinct byte string stored once, named by its hash.

A blob is written to ``tmp/`` under a random name, fsynced, made read-only
and renamed into ``blobs/<blake3 hex>``, so a file under ``blobs/`` is always
complete: a writer killed at any instant leaves at worst a stray temp file
(``gc`` sweeps those). File names come only from validated hex digests, never
from tensor names. The digest is always of the raw little-endian bytes, so a
compressed blob and a plain file of the same tensor hash alike.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from blake3 import blake3

from ..checkpoint import TensorRef
from ..errors import CkptError, FormatError
from . import compress

BLOB_DIR = "blobs"
TMP_DIR = "tmp"
TMP_SUFFIX = ".part"
#: Bytes per write()/read(): large enough to amortise syscalls, small enough for bounded memory.
IO_BYTES = 4 << 20
#: Tensors at least this big are hashed with blake3's own threads.
THREADED_HASH_BYTES = 16 << 20
HASH_RE = re.compile(r"[0-9a-f]{64}\Z")

Advance = Callable[[int], None]


def _noop(_n: int) -> None:
    pass


def store_os_error(e: OSError, root: str, action: str) -> CkptError:
    """Turn an OSError met while changing the store into one actionable line."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CkptError(f"disk full while {action}; the store was left unchanged", root)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        if action == "create the store":
            # There is no store yet, so "the store is read-only" would mislead: the place is.
            return CkptError(f"cannot create the store here ({e.strerror}): choose a directory you can write to",
                             root)
        return CkptError(f"store is read-only ({e.strerror}); cannot {action}", root)
    if action == "create the store":
        return CkptError(f"cannot create the store here: {e.strerror or e}", root)
    return CkptError(f"{action} failed: {e.strerror or e}", root)


def hash_bytes(data: memoryview | bytes) -> str:
    if len(data) >= THREADED_HASH_BYTES:
        return blake3(data, max_threads=blake3.AUTO).hexdigest()
    return blake3(data).hexdigest()


def valid_hash(h: object) -> bool:
    return isinstance(h, str) and HASH_RE.match(h) is not None


def _write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    while mv.nbytes:
        n = os.write(fd, mv)
        mv = mv[n:]


def fsync_dir(path: str) -> None:
    """Make renames into ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BlobDir:
    """The ``blobs/`` and ``tmp/`` folders of one store."""

    def __init__(self, root: str, *, compressed: bool, level: int = compress.DEFAULT_LEVEL) -> None:
        self.root = root
        self.dir = os.path.join(root, BLOB_DIR)
        self.tmp = os.path.join(root, TMP_DIR)
        self.compressed = compressed
        self.level = level

    # -- naming -------------------------------------------------------------------
    def path(self, h: str) -> str:
        if not valid_hash(h):
            raise FormatError(f"invalid blob hash {h!r} in the store database", self.root)
        return os.path.join(self.dir, h)

    def exists(self, h: str) -> bool:
        return os.path.isfile(self.path(h))

    # -- writing ------------------------------------------------------------------
    def put(self, t: TensorRef, advance: Advance = _noop) -> tuple[str, bool]:
        """Store ``t``'s bytes; returns (hash, whether a new blob file was created).

        A known ``t.hash`` whose blob exists costs one stat and no read.
        Mmap-backed tensors are hashed first (cheap) so bytes already stored are
        never written; streamed ones are hashed while written to a temp file.
        """
        known = t.hash
        if known is not None and valid_hash(known) and self.exists(known):
            advance(t.nbytes)
            return known, False
        whole = t.buffer()
        if whole is not None:
            h = hash_bytes(whole)
            self._check_known(t, h)
            if self.exists(h):
                advance(t.nbytes)
                return h, False
            tmp = self._write_temp(t, None, advance)
        else:
            hasher = blake3()
            tmp = self._write_temp(t, hasher, advance)
            h = hasher.hexdigest()
            try:
                self._check_known(t, h)
            except CkptError:
                _unlink(tmp)
                raise
            if self.exists(h):
                _unlink(tmp)
                return h, False
        try:
            os.replace(tmp, self.path(h))
        except BaseException:
            _unlink(tmp)
            raise
        return h, True

    def _check_known(self, t: TensorRef, h: str) -> None:
        if t.hash is not None and t.hash != h:
            raise CkptError(f"tensor {t.name!r}: its bytes hash to {h[:16]}…, not the {str(t.hash)[:16]}… "
                            "its source claimed", t.source)

    def _write_temp(self, t: TensorRef, hasher: blake3 | None, advance: Advance) -> str:
        os.makedirs(self.tmp, exist_ok=True)
        tmp = os.path.join(self.tmp, secrets.token_hex(12) + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            chunks = t.chunks(compress.FRAME_BYTES if self.compressed else IO_BYTES)
            if self.compressed:
                info = t.dtype_info
                enc = compress.FrameEncoder(t.nbytes, compress.group_for(info.kind, info.itemsize, t.nbytes),
                                            self.level)
                stored = blake3()
                head = enc.header()
                stored.update(head)
                _write_all(fd, head)
                for chunk in chunks:
                    if hasher is not None:
                        hasher.update(chunk)
                    for part in enc.frame(chunk):
                        stored.update(part)
                        _write_all(fd, part)
                    advance(len(chunk))
                _write_all(fd, compress.trailer(stored))
            else:
                for chunk in chunks:
                    if hasher is not None:
                        hasher.update(chunk)
                    _write_all(fd, chunk)
                    advance(len(chunk))
            os.fsync(fd)
            # Blobs are immutable: make accidental in-place edits fail loudly.
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def sync(self) -> None:
        fsync_dir(self.dir)

    # -- reading ------------------------------------------------------------------
    def pieces(self, h: str, nbytes: int, where: str) -> Iterator[bytes]:
        """The raw bytes of a blob in pieces, checking its size (not its hash)."""
        path = self.path(h)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in finally; a generator
        except FileNotFoundError:
            raise FormatError(f"blob {h[:16]}… is missing (run 'ckptdiff verify')", where) from None
        except OSError as e:
            raise CkptError(f"cannot read blob {h[:16]}…: {e.strerror}", where) from None
        with f:
            if self.compressed:
                yield from compress.decode_frames(f.read, nbytes, where)
                return
            size = os.fstat(f.fileno()).st_size
            if size != nbytes:
                raise FormatError(f"blob {h[:16]}… holds {size} bytes, expected {nbytes} "
                                  "(run 'ckptdiff verify')", where)
            left = nbytes
            while left:
                piece = f.read(min(IO_BYTES, left))
                if not piece:
                    raise FormatError(f"blob {h[:16]}… is truncated", where)
                left -= len(piece)
                yield piece

    def check(self, h: str, nbytes: int, advance: Advance = _noop) -> str | None:
        """Re-hash one blob: None if sound, else what is wrong with it."""
        if not valid_hash(h):
            return f"invalid hash {h!r}"
        hasher = blake3()
        try:
            for piece in self.pieces(h, nbytes, self.path(h)):
                hasher.update(piece)
                advance(len(piece))
        except FormatError as e:
            return "missing" if "is missing" in e.message else e.message
        except CkptError as e:
            return e.message
        got = hasher.hexdigest()
        if got != h:
            return f"content hashes to {got[:16]}…: the blob is corrupt"
        return None

    # -- housekeeping -------------------------------------------------------------
    def scan(self) -> Iterator[tuple[str, int]]:
        """(hash, bytes on disk) of every blob file; other names are ignored."""
        try:
            it = os.scandir(self.dir)
        except FileNotFoundError:
            return
        with it:
            for de in it:
                if valid_hash(de.name):
                    try:
                        yield de.name, de.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue

    def usage(self) -> int:
        return sum(size for _, size in self.scan())

    def remove(self, h: str) -> int:
        """Delete a blob; returns the bytes freed (0 if already gone)."""
        path = self.path(h)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size

    def stale_temp(self, max_age_s: float) -> Iterable[str]:
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            return []
        now = time.time()
        out = []
        for n in names:
            p = os.path.join(self.tmp, n)
            try:
                if n.endswith(TMP_SUFFIX) and now - os.stat(p).st_mtime >= max_age_s:
                    out.append(p)
            except FileNotFoundError:
                continue
        return out


#: Blob writers run in a few threads: write() and fsync() release the GIL, and
#: per-file fsync latency, not bandwidth, is what limits a many-tensor snapshot.
WRITE_THREADS = 4
#: Below this many bytes a thread pool costs more than it saves.
PARALLEL_MIN_BYTES = 8 << 20


def put_all(put: Any, tensors: Mapping[str, TensorRef], advance: Any, total: int) -> list[tuple[str, str]]:
    """(name, hash) for every tensor, in the mapping's order; all writes finished on return."""
    names = list(tensors)
    if total < PARALLEL_MIN_BYTES or len(names) < 2:
        return [(n, put(tensors[n], advance)) for n in names]
    from concurrent.futures import ThreadPoolExecutor

    results: list[tuple[str, str]] = []
    first_error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(names)), thread_name_prefix="ckptdiff-blob") as ex:
        futures = [(n, ex.submit(put, tensors[n], advance)) for n in names]
        for n, f in futures:
            if first_error is not None:
                f.cancel()
                continue
            try:
                results.append((n, f.result()))
            except BaseException as e:  # noqa: BLE001 - re-raised below once every write has stopped
                first_error = e
    if first_error is not None:
        raise first_error
    return results


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["BlobDir", "put_all", "store_os_error", "hash_bytes", "valid_hash", "fsync_dir"]
