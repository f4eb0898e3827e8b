"""Pack files: many small objects in one file, found through an index file.

One file per tiny tensor makes a 200,000-tensor snapshot 200,000 creates,
fsyncs and renames (minutes) and as many directory entries to scan. Objects
smaller than :data:`SMALL_OBJECT_BYTES` are therefore appended to the
writer's own pack file instead; addressing and dedupe stay per object (the
BLAKE3 of its raw bytes), exactly as for a loose blob.

Layout (all integers little-endian)::

    packs/<name>.pack   b"CKDP" | version u8 = 1 | compressed u8 | reserved u16
                        then the objects back to back, each stored as a loose
                        blob of the same store would be (raw bytes, or the
                        compressed blob format of :mod:`.compress`)
    packs/<name>.idx    b"CKDI" | version u8 = 1 | reserved 3 bytes | count u64 | pack size u64
                        then ``count`` records: digest 32 bytes | offset u64 | stored length u64 | raw length u64
                        then BLAKE3 (32 bytes) of everything before it

Records are in offset order and tile the pack exactly (header, then each
object right after the previous one, up to the pack size), so ``verify``
covers every byte of a pack: the header is checked, and each object is
re-hashed (and, compressed, its own checksum is checked).

Publication: a pack and its index are written in ``tmp/``, fsynced, then
renamed into ``packs/`` pack first, index last, and the folder is fsynced.
Only a pack with an index exists for readers, so a writer killed at any
instant leaves at worst temp files or an index-less pack (``gc`` removes
both); the database commit, which comes after, refers only to published
objects.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from blake3 import blake3

PACK_DIR = "packs"
PACK_SUFFIX = ".pack"
IDX_SUFFIX = ".idx"
#: Objects smaller than this go into packs. A loose file costs a create, an
#: fsync, a rename, an inode and a 4 KiB block whatever its size: for tensors
#: below 64 KiB that overhead outweighs writing the bytes themselves, while
#: bigger tensors stay loose so they stream, and are freed by gc, on their own
#: (a repack then only ever copies small objects).
SMALL_OBJECT_BYTES = 64 << 10
PACK_MAGIC = b"CKDP"
IDX_MAGIC = b"CKDI"
VERSION = 1
PACK_HEADER = struct.Struct("<4sBBH")
IDX_HEADER = struct.Struct("<4sB3xQQ")
RECORD = struct.Struct("<32sQQQ")
IDX_TRAILER_BYTES = 32
#: Pack bytes buffered in memory before one write() call.
FLUSH_BYTES = 4 << 20

WriteFn = Callable[[int, bytes], None]


class Located(NamedTuple):
    """Where a packed object lives (a tuple: a store of 200,000 objects holds as many)."""

    pack: str  # the pack's name (without suffix)
    offset: int
    length: int  # stored bytes
    nbytes: int  # raw bytes


class PackError(Exception):
    """A pack or index that is not what ckptdiff wrote (message says what)."""


def pack_header(compressed: bool) -> bytes:
    return PACK_HEADER.pack(PACK_MAGIC, VERSION, 1 if compressed else 0, 0)


def parse_pack_header(head: bytes) -> bool:
    """Whether the pack's objects are compressed; PackError for a damaged header."""
    if len(head) != PACK_HEADER.size:
        raise PackError("pack is truncated (no header)")
    magic, version, comp, reserved = PACK_HEADER.unpack(head)
    if magic != PACK_MAGIC or reserved != 0 or comp not in (0, 1):
        raise PackError("pack has a damaged header")
    if version > VERSION:
        raise PackError(f"pack version {version} is newer than this ckptdiff reads ({VERSION})")
    return comp == 1


def encode_index(records: list[tuple[str, int, int, int]], pack_size: int) -> bytes:
    body = bytearray(IDX_HEADER.pack(IDX_MAGIC, VERSION, len(records), pack_size))
    for h, off, length, nbytes in records:
        body += RECORD.pack(bytes.fromhex(h), off, length, nbytes)
    body += blake3(body).digest()
    return bytes(body)


def decode_index(data: bytes) -> tuple[int, list[tuple[str, int, int, int]]]:
    """(pack size, records) of an index file; PackError unless intact and self-consistent."""
    if len(data) < IDX_HEADER.size + IDX_TRAILER_BYTES:
        raise PackError("pack index is truncated")
    body, trailer = data[:-IDX_TRAILER_BYTES], data[-IDX_TRAILER_BYTES:]
    if blake3(body).digest() != trailer:
        raise PackError("pack index fails its checksum (damaged or truncated)")
    magic, version, count, pack_size = IDX_HEADER.unpack_from(body)
    if magic != IDX_MAGIC:
        raise PackError("pack index has a bad magic number")
    if version > VERSION:
        raise PackError(f"pack index version {version} is newer than this ckptdiff reads ({VERSION})")
    if len(body) != IDX_HEADER.size + count * RECORD.size:
        raise PackError("pack index has the wrong length for its record count")
    out = []
    expect = PACK_HEADER.size
    for digest, off, length, nbytes in RECORD.iter_unpack(memoryview(body)[IDX_HEADER.size:]):
        if off != expect:
            raise PackError("pack index records do not tile the pack")
        expect = off + length
        out.append((digest.hex(), off, length, nbytes))
    if expect != pack_size:
        raise PackError("pack index records do not tile the pack")
    return pack_size, out


class PackWriter:
    """One writer's new pack: objects appended in memory-bounded batches, published once.

    Thread-safe: the snapshot's loose-blob threads never touch it, but the
    training hook may share a store between threads.
    """

    def __init__(self, root: str, tmp_dir: str, compressed: bool, write: WriteFn,
                 fsync_dir: Callable[[str], None]) -> None:
        self.dir = os.path.join(root, PACK_DIR)
        self.tmp_dir = tmp_dir
        self.name = "pack-" + secrets.token_hex(12)
        self.compressed = compressed
        self._write = write
        self._fsync_dir = fsync_dir
        self._lock = threading.Lock()
        self._fd = -1
        self._tmp = os.path.join(tmp_dir, self.name + PACK_SUFFIX + ".part")
        self._buf = bytearray()
        self._size = 0
        self.records: list[tuple[str, int, int, int]] = []
        self.objects: dict[str, Located] = {}
        self.published = False
        #: The compressed store's zstd context for this pack's objects (set by the blob writer).
        self.cctx: object = None
        #: Loose blobs listed when the snapshot began (dedupe without a stat per
        #: object; one written meanwhile by another process at worst becomes a
        #: packed duplicate, which gc drops).
        self.loose: set[str] | None = None

    def add(self, h: str, stored: bytes | memoryview, nbytes: int) -> None:
        """Append one object's stored bytes (already hashed and, if so, compressed)."""
        with self._lock:
            if h in self.objects:
                return
            if self._fd < 0:
                self._open()
            off = self._size
            self._buf += stored
            self._size += len(stored)
            self.records.append((h, off, len(stored), nbytes))
            self.objects[h] = Located(self.name, off, len(stored), nbytes)
            if len(self._buf) >= FLUSH_BYTES:
                self._flush()

    def _open(self) -> None:
        os.makedirs(self.tmp_dir, exist_ok=True)
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._buf += pack_header(self.compressed)
        self._size = len(self._buf)

    def _flush(self) -> None:
        if self._buf:
            self._write(self._fd, bytes(self._buf))
            self._buf.clear()

    def publish(self) -> bool:
        """fsync pack and index, rename both into ``packs/`` (index last); False if empty."""
        with self._lock:
            if self._fd < 0 or self.published:
                return self.published
            self._flush()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            idx_tmp = os.path.join(self.tmp_dir, self.name + IDX_SUFFIX + ".part")
            fd = os.open(idx_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                self._write(fd, encode_index(self.records, self._size))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(self.dir, exist_ok=True)
            for p in (self._tmp, idx_tmp):
                os.chmod(p, 0o444)  # immutable: in-place edits fail loudly
            os.replace(self._tmp, os.path.join(self.dir, self.name + PACK_SUFFIX))
            os.replace(idx_tmp, os.path.join(self.dir, self.name + IDX_SUFFIX))
            self._fsync_dir(self.dir)
            self.published = True
            return True

    def abort(self) -> None:
        """Drop an unpublished pack's files, wherever publishing stopped (a published pack stays for gc)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self.published:
                for p in (self._tmp, os.path.join(self.tmp_dir, self.name + IDX_SUFFIX + ".part"),
                          os.path.join(self.dir, self.name + PACK_SUFFIX)):  # renamed, but no index yet
                    try:
                        os.unlink(p)
                    except OSError:
                        pass


class PackSet:
    """The published packs of one store, indexed in memory and mapped lazily.

    ``refresh`` picks up packs other processes published and forgets those a
    gc removed; a mapped pack stays readable after its file is deleted.
    """

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, PACK_DIR)
        self._lock = threading.Lock()
        self.index: dict[str, Located] = {}
        self.packs: dict[str, list[tuple[str, int, int, int]]] = {}
        self.damaged: dict[str, str] = {}
        self._maps: dict[str, mmap.mmap] = {}

    def names_on_disk(self) -> tuple[set[str], set[str]]:
        """(names with an index, names of pack files) in ``packs/``."""
        try:
            files = os.listdir(self.dir)
        except FileNotFoundError:
            return set(), set()
        idx = {f[:-len(IDX_SUFFIX)] for f in files if f.endswith(IDX_SUFFIX)}
        pack = {f[:-len(PACK_SUFFIX)] for f in files if f.endswith(PACK_SUFFIX)}
        return idx, pack

    def refresh(self) -> None:
        with self._lock:
            published, _ = self.names_on_disk()
            gone = set(self.packs) - published
            new = sorted(published - set(self.packs) - set(self.damaged))
            for name in gone:
                del self.packs[name]
                self._maps.pop(name, None)
            for name in set(self.damaged) - published:
                del self.damaged[name]
            if gone:
                self.index = {h: loc for h, loc in self.index.items() if loc.pack not in gone}
            for name in new:
                try:
                    with open(os.path.join(self.dir, name + IDX_SUFFIX), "rb") as f:
                        _size, records = decode_index(f.read())
                except FileNotFoundError:
                    continue
                except (OSError, PackError) as e:
                    self.damaged[name] = str(e) if isinstance(e, PackError) else (e.strerror or str(e))
                    continue
                self.packs[name] = records
                for h, off, length, nbytes in records:
                    if h not in self.index:
                        self.index[h] = Located(name, off, length, nbytes)
            if gone:  # objects of a removed pack may live on in another (a repack moved them)
                for name, records in self.packs.items():
                    for h, off, length, nbytes in records:
                        if h not in self.index:
                            self.index[h] = Located(name, off, length, nbytes)

    def add_published(self, w: PackWriter) -> None:
        """Make a pack this process just published visible without re-reading its index."""
        with self._lock:
            self.packs[w.name] = list(w.records)
            for h, loc in w.objects.items():
                self.index.setdefault(h, loc)

    def mapped(self, name: str) -> mmap.mmap:
        """The pack's bytes (mapped once, kept: readers of a snapshot may outlive the Store)."""
        with self._lock:
            m = self._maps.get(name)
            if m is None:
                with open(os.path.join(self.dir, name + PACK_SUFFIX), "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[name] = m
            return m

    def read(self, loc: Located) -> bytes:
        """The stored bytes of one object; PackError if the pack is shorter than its index says."""
        m = self.mapped(loc.pack)
        if loc.offset + loc.length > len(m):
            raise PackError("pack is truncated")
        return m[loc.offset:loc.offset + loc.length]

    def check_pack(self, name: str) -> Iterator[tuple[str, bytes, int, str | None]]:
        """(hash, stored bytes, raw size, structural problem) of each object of a pack, in order.

        A damaged header or a pack of the wrong size is a problem of every
        object in it (they cannot be trusted to be where the index says).
        """
        records = self.packs.get(name, [])
        try:
            m = self.mapped(name)
        except FileNotFoundError:
            for h, _off, _length, nbytes in records:
                yield h, b"", nbytes, "missing (its pack file is gone)"
            return
        problem = None
        try:
            parse_pack_header(m[:PACK_HEADER.size])
        except PackError as e:
            problem = str(e)
        end = records[-1][1] + records[-1][2] if records else PACK_HEADER.size
        if problem is None and len(m) != end:
            problem = f"pack holds {len(m)} bytes, its index says {end}"
        for h, off, length, nbytes in records:
            yield h, m[off:off + length], nbytes, problem

    def compressed(self, name: str) -> bool:
        return parse_pack_header(self.mapped(name)[:PACK_HEADER.size])


__all__ = ["PACK_DIR", "SMALL_OBJECT_BYTES", "Located", "PackError", "PackSet", "PackWriter", "decode_index",
           "encode_index", "parse_pack_header"]
