"""The per-tensor kernel: one fused pass that hashes, compares and measures.

This module knows two :class:`~ckptdiff.checkpoint.TensorRef` objects and
nothing else (no files, no manifest, no report). It walks both tensors chunk
by chunk, exactly once in the common case:

* each side's chunk feeds that side's BLAKE3 hasher (skipped when the source
  already knows the hash, as the store does);
* the two chunks are compared with ``memcmp`` (bitwise: one ulp, -0.0 vs
  +0.0 and different NaN payloads are all differences);
* only chunks whose bytes differ are decoded to float64 for statistics.

Statistics need ``||old||`` over the whole tensor, including chunks that
turned out identical. Decoding every identical chunk just in case would
throw away the fast path for the common "nothing changed" tensor, so the
kernel remembers which chunks were identical and, only for a tensor that did
change, revisits those chunks once at the end (usually none: a fine-tune
changes a tensor everywhere or nowhere).

Statistics live in :mod:`ckptdiff.stats`, loaded only when a tensor
differs, and measured by a small C module (numpy only as the fallback):
identical bytes need BLAKE3 and ``memcmp`` alone, and no diff of the
common dtypes pays numpy's ~50 ms import.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections.abc import Callable, Sequence
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)

import blake3

from .checkpoint import DEFAULT_CHUNK_BYTES, TensorRef, fill_exact
from .errors import FormatError

try:  # optional C kernel: a run of small tensors in one call (see compare_spans)
    from . import _ckernel
except ImportError:  # pragma: no cover - installs without a compiler
    _ckernel = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from typing import Any

    from .dtypes import DType
    from .stats import DeltaStats

#: Below this many bytes, BLAKE3's own worker threads cost more than they save.
_THREADED_HASH_BYTES = 1 << 20

Progress = Callable[[int], None]


# ---------------------------------------------------------------------------
# bitwise equality of two chunks
# ---------------------------------------------------------------------------

def _load_memcmp() -> Callable[[int, int, int], int] | None:
    """libc ``memcmp`` through ctypes, for installs without the C kernel."""
    import ctypes

    try:
        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        fn = libc.memcmp
    except (OSError, AttributeError):  # pragma: no cover - exotic platforms
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


#: ``equal(a, b, start, n)``: memcmp of two buffers' ranges, from the C kernel (the GIL released for
#: big ranges); without it, libc's memcmp through ctypes on raw addresses.
_EQUAL = _ckernel.equal if _ckernel is not None else None
_MEMCMP = _load_memcmp() if _EQUAL is None else None


def bytes_equal(a: memoryview, b: memoryview) -> bool:
    """Bitwise equality of two byte buffers.

    ``memcmp`` runs at memory speed (~20 GB/s here) and releases the GIL;
    ``memoryview.__eq__`` walks items one by one (~1 GB/s). The engine's
    own buffers skip this (see _IOBuffers); this is for views of mmaps and
    arrays.
    """
    n = a.nbytes
    if n != b.nbytes:
        return False
    if n == 0:
        return True
    if _EQUAL is not None:
        return _EQUAL(a.cast("B") if a.format != "B" else a, b.cast("B") if b.format != "B" else b, 0, n)
    import numpy as np  # only numpy tells these views' addresses without a copy

    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    if _MEMCMP is not None:
        return _MEMCMP(x.ctypes.data, y.ctypes.data, n) == 0
    return bool(np.array_equal(x, y))  # pragma: no cover


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE


def release_pages(view: memoryview) -> None:
    """Let the kernel unmap the file pages behind a processed chunk.

    Pages of a file mapping that the process has touched count in its RSS
    until unmapped, so walking two 2 GB mmaps would show 4 GB resident even
    though the engine holds two chunks at a time. For a view into a
    read-only ``mmap.mmap`` (the safetensors and .npy/.npz readers),
    ``MADV_DONTNEED`` drops the mapping of whole pages inside the chunk; the
    data stays in the page cache and re-faults cheaply if read again. Views
    of anything else (numpy arrays, torch storages) are left alone: for
    anonymous memory DONTNEED would discard data.
    """
    mm = view.obj
    # Read-only views only: an ACCESS_READ map is shared and never written, so
    # dropping its pages cannot lose data (an ACCESS_COPY map could).
    if _DONTNEED is None or not isinstance(mm, mmap.mmap) or not view.readonly or view.nbytes < 2 * _PAGE:
        return
    try:
        import numpy as np

        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        start = np.frombuffer(view, dtype=np.uint8).ctypes.data - base
        lo = -(-start // _PAGE) * _PAGE
        hi = (start + view.nbytes) // _PAGE * _PAGE
        if hi > lo:
            mm.madvise(_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, TypeError):  # closed map, exotic platform: only a memory hint
        pass


def new_hasher(nbytes: int) -> blake3.blake3:
    if nbytes >= _THREADED_HASH_BYTES and getattr(_LOCAL, "hash_threads", True):
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def in_worker_thread() -> None:
    """Mark the calling thread as one of the engine's tensor workers.

    The workers already keep every core busy, one tensor each; BLAKE3's own
    threads on top only add hand-offs (measured: 0.18 s vs 0.22 s for a 1 GB
    pair on two cores), so hashers made on this thread stay single-threaded.
    """
    _LOCAL.hash_threads = False


def hash_ref(ref: TensorRef, chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: Progress | None = None) -> str:
    """BLAKE3 hex of one tensor's bytes (the known hash when the source has one)."""
    if ref.hash is not None:
        if progress:
            progress(ref.nbytes)
        return ref.hash
    h = new_hasher(ref.nbytes)
    into = _io_buffers(chunk_bytes).mva if ref.read_into is not None else None
    for chunk in ref.chunks(chunk_bytes, into):
        h.update(chunk)
        release_pages(chunk)
        if progress:
            progress(chunk.nbytes)
    return h.hexdigest()


# ---------------------------------------------------------------------------
_LOCAL = threading.local()


class _IOBuffers:
    """This thread's two landing buffers for ``read_into`` sources, reused across tensors.

    Fresh chunk-sized buffers would page-fault on every tensor; two per
    thread stay mapped (and warm in cache) for the whole diff. Without the
    C kernel their addresses are taken once (ctypes), so comparing a small
    pair costs one memcmp call rather than four numpy/ctypes wrappers.
    """

    __slots__ = ("a", "b", "mva", "mvb", "addr_a", "addr_b", "size")

    def __init__(self, size: int) -> None:
        # Anonymous maps, not bytearrays: a bytearray is zero-filled, which
        # faults in all 2 x 1 MiB per thread up front even when the largest
        # tensor is a few KiB, and untouched pages of a map cost nothing.
        # They live as long as the thread (exported to the views below, and
        # to ctypes without the C kernel, so they are never closed).
        self.size = size
        self.a, self.b = mmap.mmap(-1, max(size, 1)), mmap.mmap(-1, max(size, 1))
        self.mva, self.mvb = memoryview(self.a)[:size], memoryview(self.b)[:size]
        self.addr_a = self.addr_b = 0
        if _MEMCMP is not None:
            import ctypes

            self.addr_a = ctypes.addressof(ctypes.c_char.from_buffer(self.a))
            self.addr_b = ctypes.addressof(ctypes.c_char.from_buffer(self.b))

    def holds(self, ca: memoryview, cb: memoryview) -> bool:
        """True when two chunks are this thread's buffers (both start at offset 0)."""
        return ca.obj is self.a and cb.obj is self.b


def _io_buffers(chunk_bytes: int) -> _IOBuffers:
    io = getattr(_LOCAL, "io", None)
    if io is None or io.size != chunk_bytes:
        io = _LOCAL.io = _IOBuffers(chunk_bytes)
    return io


def _new_stats(info: DType, atol: float, rtol: float, row_len: int) -> DeltaStats:
    global _DeltaStats
    if _DeltaStats is None:
        from .stats import DeltaStats as _DeltaStats
    return _DeltaStats(info, atol, rtol, row_len)


#: ckptdiff.stats.DeltaStats, imported at the first changed tensor (identical bytes need no statistics).
_DeltaStats: type[DeltaStats] | None = None
_measured_row: Callable[..., tuple | None] | None = None  # type: ignore[type-arg]


def row_len(shape: Sequence[int]) -> int:
    """Elements per row (the first dimension's step) when rows mean something: two dimensions or more."""
    if len(shape) < 2:
        return 0
    n = 1
    for d in shape[1:]:
        n *= d
    return n


class PairResult:
    """The kernel's answer for one pair: both hashes, and statistics unless the bytes are identical."""

    __slots__ = ("hash_old", "hash_new", "stats")

    def __init__(self, hash_old: str | None, hash_new: str | None, stats: DeltaStats | None) -> None:
        self.hash_old, self.hash_new = hash_old, hash_new  # None: identical and not hashed (hash_identical=False)
        self.stats = stats  # None: bitwise identical

    @property
    def identical(self) -> bool:
        return self.stats is None


#: An identical pair that nobody asked the hash of.
_UNHASHED = PairResult(None, None, None)


def _buffers_equal(io: _IOBuffers, start: int, n: int) -> bool:
    if n == 0:
        return True
    if _EQUAL is not None:
        return _EQUAL(io.a, io.b, start, n)
    if _MEMCMP is not None and io.addr_a:
        return _MEMCMP(io.addr_a + start, io.addr_b + start, n) == 0
    return io.mva[start:start + n] == io.mvb[start:start + n]  # pragma: no cover - no libc


def _result(info: DType, ca: memoryview, cb: memoryview, same: bool, atol: float, rtol: float,
            rows: int, hash_identical: bool = True) -> PairResult:
    """Hashes, and statistics if the bytes differ, of one pair already in memory."""
    if same and not hash_identical:
        return _UNHASHED
    n = ca.nbytes
    h = new_hasher(n)
    h.update(ca)
    hash_old = h.hexdigest()
    if same:
        return PairResult(hash_old, hash_old, None)
    h = new_hasher(n)
    h.update(cb)
    stats = _new_stats(info, atol, rtol, rows)
    stats.add_changed(ca, cb)
    return PairResult(hash_old, h.hexdigest(), stats)


def _compare_small(old: TensorRef, new: TensorRef, io: _IOBuffers, atol: float, rtol: float,
                   progress: Progress | None, hash_identical: bool) -> PairResult:
    """A pair that fits in one chunk, read straight into this thread's buffers.

    Same answers as the streaming loop, without its generators and
    wrappers: most tensors of most models are this small, and a
    2,000-tensor model pays any per-tensor cost 2,000 times.
    """
    n = old.nbytes
    va, vb = io.mva[:n], io.mvb[:n]
    assert old.read_into is not None and new.read_into is not None
    fill_exact(old.read_into, va, 0, n, f"tensor {old.name!r}")
    fill_exact(new.read_into, vb, 0, n, f"tensor {new.name!r}")
    res = _result(old.dtype_info, va, vb, _buffers_equal(io, 0, n), atol, rtol, row_len(old.shape), hash_identical)
    if progress:
        progress(2 * n)
    return res


def compare_run(
    pairs: Sequence[tuple[TensorRef, TensorRef]],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    hash_identical: bool = True,
) -> list[PairResult]:
    """Compare a run of small tensor pairs that lie side by side in both files.

    A model's many small tensors (norms, biases, small convs) would otherwise
    cost two ``pread`` calls, a ``memcmp`` and the Python around them each.
    The engine forms runs (``engine._plan``) where every pair has one dtype
    and shape, each side's tensors sit in one descriptor (``file_span``) at
    the same distances from the run's first tensor, and the whole run spans
    at most ``chunk_bytes``. Then one ``pread`` per side fills this thread's
    buffers, one ``memcmp`` says whether the whole run is identical (frozen
    layers: the usual answer), and each tensor is hashed from its slice.
    Results are the same as :func:`compare_pair` on each pair.
    """
    io = _io_buffers(chunk_bytes)
    first_old, first_new = pairs[0]
    assert first_old.file_span is not None and first_new.file_span is not None
    fd_a, lo_a = first_old.file_span
    fd_b, lo_b = first_new.file_span
    span = max(old.file_span[1] + old.nbytes for old, _new in pairs) - lo_a  # type: ignore[index]
    assert span <= chunk_bytes
    va, vb = io.mva[:span], io.mvb[:span]
    what = f"the {len(pairs)} tensors from {first_old.name!r} on"
    fill_exact(lambda off, b: os.preadv(fd_a, [b], lo_a + off), va, 0, span, f"OLD: {what}")
    fill_exact(lambda off, b: os.preadv(fd_b, [b], lo_b + off), vb, 0, span, f"NEW: {what}")
    whole_same = _buffers_equal(io, 0, span)
    out: list[PairResult] = []
    done = 0
    plain_hash = blake3.blake3
    for old, new in pairs:
        start = old.file_span[1] - lo_a  # type: ignore[index]
        assert new.file_span is not None and new.file_span[1] - lo_b == start, "not a run"
        n = old.nbytes
        if n < _THREADED_HASH_BYTES and (whole_same or _buffers_equal(io, start, n)):
            # The usual answer, in one hasher call: a run's frozen tensor pays per-tensor cost only here.
            if hash_identical:
                h = plain_hash(va[start:start + n]).hexdigest()
                out.append(PairResult(h, h, None))
            else:
                out.append(_UNHASHED)
        else:
            same = whole_same or _buffers_equal(io, start, n)
            out.append(_result(old.dtype_info, va[start:start + n], vb[start:start + n], same, atol, rtol,
                               row_len(old.shape), hash_identical))
        done += 2 * n
    if progress:
        progress(done)
    return out


def _identical_prefix(old: TensorRef, new: TensorRef, io: _IOBuffers | None, chunk_bytes: int,
                      progress: Progress | None) -> int | None:
    """None when the two tensors' bytes are identical, else how many leading bytes (whole chunks) are.

    Compares chunk by chunk without hashing, and counts the identical chunks as progress."""
    into_a, into_b = (io.mva, io.mvb) if io is not None else (None, None)
    done = 0
    for ca, cb in zip(old.chunks(chunk_bytes, into_a), new.chunks(chunk_bytes, into_b), strict=True):
        if io is not None and io.holds(ca, cb):
            same = ca.nbytes == cb.nbytes and _buffers_equal(io, 0, ca.nbytes)
        else:
            same = bytes_equal(ca, cb)
        release_pages(ca)
        release_pages(cb)
        if not same:
            return done
        done += ca.nbytes
        if progress:
            progress(ca.nbytes + cb.nbytes)
    return None


def _skipping(progress: Progress, skip: int) -> Progress:
    """``progress``, leaving out the first ``skip`` bytes reported to it."""
    left = skip

    def report(n: int) -> None:
        nonlocal left
        take = min(left, n)
        left -= take
        if n > take:
            progress(n - take)

    return report


def compare_pair(
    old: TensorRef,
    new: TensorRef,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    hash_identical: bool = True,
) -> PairResult:
    """Compare two tensors of the same dtype and shape, bitwise, in one streaming pass.

    While the two sides agree, one BLAKE3 state serves both: an identical
    chunk is hashed once, not twice, and identical chunks are most of the
    bytes of a fine-tune diff. At the first differing chunk the state is
    copied and each side continues on its own. Sources with ``read_into``
    are streamed through this thread's two reused buffers.

    ``hash_identical=False``: a pair whose bytes are identical is not hashed
    (both hashes None), for a report that will not list it. The bytes are
    compared first, with no hashing; at the first difference the pair is
    compared again from its start with hashes, which reads the identical
    prefix twice (a trained tensor usually differs in its first chunk).
    """
    assert old.dtype == new.dtype and old.shape == new.shape
    if old.hash is not None and old.hash == new.hash:
        if progress:
            progress(old.nbytes + new.nbytes)
        return PairResult(old.hash, new.hash, None)

    info = old.dtype_info
    io = _io_buffers(chunk_bytes) if old.read_into or new.read_into else None
    if io is not None and old.nbytes <= chunk_bytes and old.read_into and new.read_into \
            and old.hash is None and new.hash is None:
        return _compare_small(old, new, io, atol, rtol, progress, hash_identical)
    if not hash_identical and old.hash is None and new.hash is None:
        prefix = _identical_prefix(old, new, io, chunk_bytes, progress)
        if prefix is None:
            return _UNHASHED
        if prefix and progress:
            progress = _skipping(progress, 2 * prefix)  # the prefix's bytes were counted once already
    into_a, into_b = (io.mva, io.mvb) if io is not None else (None, None)
    h_old = new_hasher(old.nbytes) if old.hash is None else None
    shared = h_old is not None and new.hash is None  # one state for both sides, so far
    h_new = new_hasher(new.nbytes) if new.hash is None and not shared else None
    stats: DeltaStats | None = None
    same_chunks: list[int] = []
    offset = 0
    chunks = zip(old.chunks(chunk_bytes, into_a), new.chunks(chunk_bytes, into_b), strict=True)
    for i, (ca, cb) in enumerate(chunks):
        if io is not None and io.holds(ca, cb):
            same = ca.nbytes == cb.nbytes and _buffers_equal(io, 0, ca.nbytes)
        else:
            same = bytes_equal(ca, cb)
        if shared and not same:
            assert h_old is not None
            h_new = h_old.copy()
            shared = False
        if h_old is not None:
            h_old.update(ca)
        if h_new is not None:
            h_new.update(cb)
        if same:
            same_chunks.append(i)
        else:
            if stats is None:
                stats = _new_stats(info, atol, rtol, row_len(old.shape))
            stats.add_changed(ca, cb, offset)
        offset += ca.nbytes
        release_pages(ca)
        release_pages(cb)
        if progress:
            progress(ca.nbytes + cb.nbytes)

    if stats is not None and same_chunks:
        wanted = set(same_chunks)
        for i, ca in enumerate(old.chunks(chunk_bytes, into_a)):
            if i in wanted:
                stats.add_identical(ca)
                release_pages(ca)

    hash_old = old.hash if h_old is None else h_old.hexdigest()
    hash_new = hash_old if shared else (new.hash if h_new is None else h_new.hexdigest())
    assert hash_old is not None and hash_new is not None
    return PairResult(hash_old, hash_new, stats)


#: Tensors up to this many bytes are hashed by the C kernel's own BLAKE3,
#: without the GIL: SIMD code (AVX2 or SSE4.1, several chunks or several
#: equal-sized tensors side by side) where the CPU has it, portable code
#: elsewhere. Bigger ones are hashed by the blake3 package, one call each.
#: The package hashes a single large input up to a fifth faster, but then
#: every tensor costs a Python call under the GIL; with whole runs hashed in
#: C the benchmark pairs' diffs measured faster end to end, so the kernel
#: hashes everything a run holds.
C_HASH_MAX = 1 << 62

def blake3_digest(data: Any) -> bytes:
    """The 32-byte BLAKE3 digest of a buffer: the C kernel's (without the GIL), else the blake3 package's."""
    if _ckernel is not None:
        return _ckernel.blake3(data)
    return blake3.blake3(data).digest()


#: Bits of compare_spans' per-tensor flags.
DIFFERS, HASHED = 1, 2

#: Bytes of one digest in compare_spans' digest buffers.
DIGEST_SIZE = 32


def compare_spans(fd_a: int, pos_a: int, fd_b: int, pos_b: int, span: int, offsets: memoryview,
                  sizes: memoryview, flags: memoryview, digests: memoryview, new_digests: memoryview,
                  chunk_bytes: int, what: str, hash_identical: bool = True) -> tuple[memoryview, memoryview, int]:
    """Compare a run of tensors that lie side by side in two files, tensor by tensor, with no object per tensor.

    Reads ``span`` bytes at ``pos_a`` of ``fd_a`` and at ``pos_b`` of
    ``fd_b`` into this thread's buffers; tensor ``k`` is bytes
    ``offsets[k] .. offsets[k] + sizes[k]`` of both (int64 views). Fills
    ``flags[k]`` (DIFFERS when the bytes differ), ``digests[32k:32k+32]``
    (BLAKE3 of the old side) and, only for tensors that differ,
    ``new_digests[32k:32k+32]`` (BLAKE3 of the new side). Returns the two
    buffers' views of the run (valid until this thread's next comparison,
    for the caller to measure changed tensors) and how many tensors differ.
    ``hash_identical=False`` leaves the digests of identical tensors unwritten.
    """
    io = _io_buffers(chunk_bytes)
    va, vb = io.mva[:span], io.mvb[:span]
    if _ckernel is not None:
        got = _ckernel.compare_run(fd_a, pos_a, fd_b, pos_b, span, io.a, io.b, offsets, sizes, C_HASH_MAX,
                                   flags, digests, new_digests, hash_identical)
        if got < 0:
            raise FormatError(f"{what}: a file ended before the bytes its header promises")
        if span <= C_HASH_MAX:  # every tensor lies in the span, so the kernel hashed them all
            return va, vb, got
        differ = got
    else:
        fill_exact(lambda off, b: os.preadv(fd_a, [b], pos_a + off), va, 0, span, f"OLD: {what}")
        fill_exact(lambda off, b: os.preadv(fd_b, [b], pos_b + off), vb, 0, span, f"NEW: {what}")
        whole_same = _buffers_equal(io, 0, span)
        differ = 0
        for k, (start, n) in enumerate(zip(offsets, sizes)):
            same = whole_same or _buffers_equal(io, start, n)
            flags[k] = 0 if same else DIFFERS
            differ += not same
    digest = blake3.blake3
    for k, (start, n) in enumerate(zip(offsets, sizes)):
        f = flags[k]
        if not f & HASHED and (hash_identical or f & DIFFERS):
            at = DIGEST_SIZE * k
            digests[at:at + DIGEST_SIZE] = digest(va[start:start + n]).digest()
            if f & DIFFERS:
                new_digests[at:at + DIGEST_SIZE] = digest(vb[start:start + n]).digest()
    return va, vb, differ


def measured_row(info: DType, va: memoryview, vb: memoryview, atol: float, rtol: float, shape: Sequence[int],
                 numel: int, name: str) -> tuple | None:  # type: ignore[type-arg]
    """:func:`ckptdiff.stats.measured_row`: a changed tensor's numbers and cause in one C call, or None."""
    global _measured_row
    if _measured_row is None:
        from .stats import measured_row as _measured_row
    return _measured_row(info, va, vb, atol, rtol, numel, shape[0] if len(shape) >= 2 else -1, row_len(shape), name)


def changed_stats(info: DType, va: memoryview, vb: memoryview, atol: float, rtol: float,
                  shape: Sequence[int]) -> DeltaStats:
    """Statistics of one changed tensor whose two sides are in memory."""
    global _DeltaStats
    if _DeltaStats is None:
        from .stats import DeltaStats as _DeltaStats
    return _DeltaStats.of_pair(info, va, vb, atol, rtol, row_len(shape))
