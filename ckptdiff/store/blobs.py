"""Content-addressed blob files: each distinct byte string stored once, named by its hash.

A blob is written to ``tmp/`` under a random name, fsynced, made read-only
and renamed into ``blobs/<blake3 hex>``, so a file under ``blobs/`` is always
complete: a writer killed at any instant leaves at worst a stray temp file
(``gc`` sweeps those). File names come only from validated hex digests, never
from tensor names. The digest is always of the raw little-endian bytes, so a
compressed blob and a plain file of the same tensor hash alike.

Objects smaller than :data:`~.packs.SMALL_OBJECT_BYTES` written by a
snapshot go into that snapshot's pack file instead (see :mod:`.packs`); every
reader here finds an object in a pack or as a loose file alike, so stores
written before packs existed read unchanged.
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
from .packs import IDX_SUFFIX, PACK_DIR, PACK_SUFFIX, Located, PackError, PackSet, PackWriter

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
        self.packs = PackSet(root)

    # -- naming -------------------------------------------------------------------
    def path(self, h: str) -> str:
        if not valid_hash(h):
            raise FormatError(f"invalid blob hash {h!r} in the store database", self.root)
        return os.path.join(self.dir, h)

    def exists(self, h: str) -> bool:
        """Whether the object is stored, packed (as of the last refresh) or loose."""
        return h in self.packs.index or os.path.isfile(self.path(h))

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes not stored now (packs re-listed first: other writers may have published)."""
        self.packs.refresh()
        return [h for h in hashes if not self.exists(h)]

    def stored_size(self, h: str) -> int:
        loc = self.packs.index.get(h)
        if loc is not None:
            return loc.length
        try:
            return os.stat(self.path(h)).st_size
        except OSError:
            return 0

    def locate(self, h: str) -> tuple[str, int, int]:
        """(file, offset, stored length) of an object: a loose blob file, or its span in a pack."""
        path = self.path(h)
        if h not in self.packs.index and not os.path.exists(path):
            self.packs.refresh()
        loc = self.packs.index.get(h)
        if loc is not None:
            return os.path.join(self.root, PACK_DIR, loc.pack + PACK_SUFFIX), loc.offset, loc.length
        return path, 0, os.stat(path).st_size

    def new_pack(self) -> PackWriter:
        """A pack of this writer's own for a snapshot's small objects (publish or abort it)."""
        return PackWriter(self.root, self.tmp, self.compressed, lambda fd, b: _write_all(fd, b), fsync_dir)

    # -- writing ------------------------------------------------------------------
    def put(self, t: TensorRef, advance: Advance = _noop) -> tuple[str, bool]:
        """Store ``t``'s bytes as a loose blob file; returns (hash, whether a new file was created).

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

    def put_packed(self, t: TensorRef, pack: PackWriter) -> str:
        """Store a small tensor's bytes in ``pack`` unless already stored; returns its hash.

        Kept lean: a 200,000-tensor snapshot calls it 200,000 times.
        """
        known = t.hash
        if known is not None and valid_hash(known) and self._stored(known, pack):
            return known
        whole = t.buffer()
        data = whole if whole is not None else b"".join(t.chunks(IO_BYTES))
        h = blake3(data).hexdigest()
        self._check_known(t, h)
        if self._stored(h, pack):
            return h
        if self.compressed:
            if pack.cctx is None:  # one zstd context per pack: contexts are not thread-safe
                import zstandard

                pack.cctx = zstandard.ZstdCompressor(level=self.level)
            info = t.dtype_info
            stored: bytes | memoryview = compress.encode(data, compress.group_for(info.kind, info.itemsize, t.nbytes),
                                                         pack.cctx)
        else:
            stored = data
        pack.add(h, stored, t.nbytes)
        return h

    def _stored(self, h: str, pack: PackWriter) -> bool:
        if h in pack.objects or h in self.packs.index:
            return True
        return h in pack.loose if pack.loose is not None else os.path.isfile(self.path(h))

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
        loc = self.packs.index.get(h)
        if loc is None and not os.path.exists(self.path(h)):
            self.packs.refresh()  # another process may have published or repacked it
            loc = self.packs.index.get(h)
        if loc is not None:
            yield from self._packed_pieces(h, loc, nbytes, where)
            return
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

    def _packed_pieces(self, h: str, loc: Located, nbytes: int, where: str) -> Iterator[bytes]:
        missing = FormatError(f"blob {h[:16]}… is missing (run 'ckptdiff verify')", where)
        try:
            try:
                stored = self.packs.read(loc)
            except FileNotFoundError:  # a gc repacked it since we indexed: look again
                self.packs.refresh()
                again = self.packs.index.get(h)
                if again is None or again == loc:
                    raise missing from None
                try:
                    stored = self.packs.read(again)
                except FileNotFoundError:
                    raise missing from None
        except PackError as e:
            raise FormatError(f"blob {h[:16]}…: {e} (run 'ckptdiff verify')", where) from None
        except (OSError, ValueError) as e:
            raise CkptError(f"cannot read blob {h[:16]}… from its pack: {getattr(e, 'strerror', None) or e}",
                            where) from None
        yield from self._decode(h, stored, nbytes, where)

    def _decode(self, h: str, stored: bytes, nbytes: int, where: str) -> Iterator[bytes]:
        """A packed object's raw bytes from its stored bytes (which are whole: objects are small)."""
        if self.compressed:
            import io

            yield from compress.decode_frames(io.BytesIO(stored).read, nbytes, where)
            return
        if len(stored) != nbytes:
            raise FormatError(f"blob {h[:16]}… holds {len(stored)} bytes, expected {nbytes} "
                              "(run 'ckptdiff verify')", where)
        yield stored

    def check(self, h: str, nbytes: int, advance: Advance = _noop) -> str | None:
        """Re-hash one blob: None if sound, else what is wrong with it."""
        if not valid_hash(h):
            return f"invalid hash {h!r}"
        return self._rehash(h, self.pieces(h, nbytes, self.path(h)), advance)

    @staticmethod
    def _rehash(h: str, pieces: Iterator[bytes], advance: Advance) -> str | None:
        hasher = blake3()
        try:
            for piece in pieces:
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

    def check_all(self, need: Mapping[str, int], advance: Advance = _noop) -> tuple[dict[str, str], list[str]]:
        """Re-hash every object ``need`` names (hash -> raw size) and every packed one.

        Returns (hash -> problem for needed objects, problems of the packs
        themselves: a damaged index, a corrupt object no snapshot uses). Packs
        are read pack by pack, in file order, not object by object.
        """
        self.packs.refresh()
        bad: dict[str, str] = {}
        other: list[str] = [f"pack {name}: its index is unreadable ({why}); the objects it lists cannot be found"
                            for name, why in sorted(self.packs.damaged.items())]
        seen: set[str] = set()
        for name in sorted(self.packs.packs):
            comp = None
            try:
                comp = self.packs.compressed(name)
            except (PackError, OSError):
                pass
            for h, stored, nbytes, problem in self.packs.check_pack(name):
                want = need.get(h)
                if problem is None and comp != self.compressed:
                    problem = "pack has a damaged header"
                if problem is None:
                    size = nbytes if want is None else want
                    problem = self._rehash(h, self._decode(h, stored, size, name), advance if want else _noop)
                if problem is None:
                    seen.add(h)
                    bad.pop(h, None)  # a sound copy elsewhere serves
                elif want is not None and h not in seen:
                    bad[h] = problem
                elif want is None:
                    other.append(f"pack {name}: object {h[:16]}… (used by no snapshot): {problem}")
        for h, nbytes in need.items():
            if h not in seen and h not in bad:
                problem = self.check(h, nbytes, advance)
                if problem is not None:
                    bad[h] = problem
        return bad, other

    # -- housekeeping -------------------------------------------------------------
    def scan_loose(self) -> Iterator[tuple[str, int]]:
        """(hash, bytes on disk) of every loose blob file; other names are ignored."""
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

    def scan(self) -> Iterator[tuple[str, int]]:
        """(hash, stored bytes) of every object, loose or packed (packs re-listed first)."""
        self.packs.refresh()
        loose = dict(self.scan_loose())
        yield from loose.items()
        for h, loc in self.packs.index.items():
            if h not in loose:
                yield h, loc.length

    def usage(self) -> int:
        """Bytes on disk: loose blob files plus pack and index files."""
        total = sum(size for _, size in self.scan_loose())
        try:
            with os.scandir(os.path.join(self.root, PACK_DIR)) as it:
                for de in it:
                    if de.name.endswith((PACK_SUFFIX, IDX_SUFFIX)):
                        try:
                            total += de.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            continue
        except FileNotFoundError:
            pass
        return total

    def remove(self, h: str) -> int:
        """Delete a loose blob; returns the bytes freed (0 if already gone). Packed objects go by repack."""
        path = self.path(h)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size

    def drop_pack(self, name: str) -> None:
        """Unpublish a pack: its index first (then no reader looks in it), then its data."""
        d = os.path.join(self.root, PACK_DIR)
        for suffix in (IDX_SUFFIX, PACK_SUFFIX):
            try:
                os.unlink(os.path.join(d, name + suffix))
            except FileNotFoundError:
                pass

    def repack(self, referenced: set[str]) -> tuple[int, int, int]:
        """Rewrite packs holding objects nothing references (or held twice) without them.

        Only called under the exclusive gc lock, so no writer is between
        publishing a pack and committing. Returns (objects dropped, their
        stored bytes, objects kept in packs). Order, for crash safety: the new
        pack is published (fsynced, renamed) before any old one is unpublished,
        so every referenced object is in some published pack at every instant;
        an interrupted repack leaves duplicates, which the next one drops.
        Index-less packs (a writer killed while publishing) are deleted. With
        more than MERGE_PACKS packs, all are merged into one so that opening a
        store stays a handful of index reads.
        """
        self.packs.refresh()
        published, files = self.packs.names_on_disk()
        for name in files - published:
            self.drop_pack(name)
        seen = {h for h, _ in self.scan_loose() if h in referenced}
        names = sorted(self.packs.packs)
        merge = len(names) > MERGE_PACKS
        rewrite: list[str] = []
        keep: list[tuple[str, str, int, int, int]] = []
        dropped = freed = 0
        for name in names:
            records = self.packs.packs[name]
            mine = [(name, *r) for r in records if r[0] in referenced and r[0] not in seen]
            seen.update(r[1] for r in mine)
            if len(mine) == len(records) and not merge:
                continue
            rewrite.append(name)
            keep += mine
            dropped += len(records) - len(mine)
            freed += sum(r[2] for r in records) - sum(r[3] for r in mine)
        if rewrite:
            if keep:
                w = self.new_pack()
                try:
                    for name, h, off, length, nbytes in keep:
                        w.add(h, self.packs.read(Located(name, off, length, nbytes)), nbytes)
                    w.publish()
                finally:
                    w.abort()
            for name in rewrite:
                self.drop_pack(name)
            fsync_dir(os.path.join(self.root, PACK_DIR))
            self.packs.refresh()
        kept = sum(len(r) for r in self.packs.packs.values())
        return dropped, freed, kept

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


#: gc merges all packs into one when there are more than this many (one per snapshot adds up).
MERGE_PACKS = 16

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
