"""The run kernel (ckptdiff._ckernel): its BLAKE3 and its per-tensor compare and hash.

The blake3 package is the oracle for every digest; flags and counts are
checked against a plain Python comparison of the same slices. Every BLAKE3
test runs at each code level this CPU has (``SIMD_LEVELS``: the portable
code, then SSE4.1, AVX2 and AVX-512 where present), chosen with the ``_set_simd``
test hook. Bad offsets, sizes, buffers and descriptors must raise, never
crash.
"""

from __future__ import annotations

import functools
import mmap
import os
import random
import threading
from array import array

import blake3
import pytest

ck = pytest.importorskip("ckptdiff._ckernel")

PATTERN = bytes(range(251))  # a prime period, so no chunk or block repeats another's bytes


def pattern(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def oracle(data) -> bytes:
    return blake3.blake3(data).digest()


LEVELS = list(range(len(ck.SIMD_LEVELS)))


@pytest.fixture(params=LEVELS, ids=lambda level: ck.SIMD_LEVELS[level])
def level(request):
    """Each code level this CPU has, restored afterwards."""
    previous = ck._set_simd(request.param)
    yield request.param
    ck._set_simd(previous)


# ---------------------------------------------------------------------------
# BLAKE3


def test_simd_levels_and_hook():
    assert ck.SIMD_LEVELS[0] == "portable"
    assert set(ck.SIMD_LEVELS) <= {"portable", "sse4.1", "avx2", "avx512"}
    best = len(ck.SIMD_LEVELS) - 1
    assert ck._set_simd(0) == best  # the widest is picked when the module loads
    assert ck._set_simd(False) == 0
    assert ck._set_simd(best) == 0
    for bad in (-1, best + 1, 1 << 70):
        with pytest.raises((ValueError, OverflowError)):
            ck._set_simd(bad)
    with pytest.raises(TypeError):
        ck._set_simd("avx2")
    assert ck._set_simd(best) == best


def test_blake3_every_length_up_to_four_chunks(level):
    """Every length 0..4200: empty input, partial and whole blocks and chunks, and trees of up to five chunks."""
    data = pattern(4200)
    for n in range(4201):
        assert ck.blake3(data[:n]) == oracle(data[:n]), n


LONG_PATTERN = pattern(2050 * 1024 + 1)


@functools.lru_cache(maxsize=None)
def pattern_digest(n: int) -> bytes:
    return oracle(memoryview(LONG_PATTERN)[:n])


def test_blake3_around_every_whole_chunk_count(level):
    """k * 1024 - 1, k * 1024 and k * 1024 + 1 for every k to 2050: each lane count, remainder and tree shape.

    The portable code (one chunk at a time, the same tree for every k) takes
    every k to 300 and every 7th and every power of two beyond, to keep the
    test short.
    """
    view = memoryview(LONG_PATTERN)
    ks = range(1, 2051)
    if ck.SIMD_LEVELS[level] == "portable":
        ks = [k for k in ks if k <= 300 or k % 7 == 0 or k & (k - 1) == 0 or (k + 1) & k == 0]
    for k in ks:
        for n in (k * 1024 - 1, k * 1024, k * 1024 + 1):
            assert ck.blake3(view[:n]) == pattern_digest(n), n


@pytest.mark.parametrize("chunks", [255, 256, 257, 511, 512, 513, 767, 768, 769, 4095, 4096, 4097])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_blake3_around_whole_batch_counts(level, chunks, extra):
    """Long inputs go through the vector code in batches of whole subtrees: their edges and merges."""
    data = pattern(chunks * 1024 + extra)
    assert ck.blake3(data) == oracle(data)


def test_blake3_random_lengths_and_bytes(level):
    rnd = random.Random(20240601 + level)
    lengths = [8193, (1 << 20) + 7, 3 * (1 << 20) + 12345, 3 << 20]
    lengths += [rnd.randrange(4200, 300_000) for _ in range(20)] + [rnd.randrange(3 << 20) for _ in range(4)]
    for n in lengths:
        data = rnd.randbytes(n)
        assert ck.blake3(data) == oracle(data), n


def test_blake3_levels_agree_on_unaligned_views(level):
    """Inputs at every alignment, as the tensors of a run are."""
    data = pattern(40_000)
    for start in range(17):
        view = memoryview(data)[start:start + 20_000 + 1000 * start]
        assert ck.blake3(view) == oracle(view), start


def test_blake3_takes_any_contiguous_buffer():
    data = pattern(5000)
    want = oracle(data[3:4003])
    assert ck.blake3(memoryview(data)[3:4003]) == want  # unaligned start
    assert ck.blake3(bytearray(data[3:4003])) == want
    assert ck.blake3(array("b", data[3:4003])) == want
    m = mmap.mmap(-1, 4000)
    m.write(data[3:4003])
    assert ck.blake3(m) == want
    m.close()
    with pytest.raises((TypeError, BufferError)):
        ck.blake3(memoryview(data)[::2])
    with pytest.raises(TypeError):
        ck.blake3("text")


# ---------------------------------------------------------------------------
# The run kernel

DIFFERS, HASHED, D = ck.FLAG_DIFFERS, ck.FLAG_HASHED, ck.DIGEST_SIZE
SENTINEL = 0xA5


def test_constants():
    assert (DIFFERS, HASHED, D) == (1, 2, 32)
    assert not hasattr(ck, "DIGEST_STRIDE")


def expected(a: bytes, b: bytes, offsets, sizes, hash_max: int):
    """What the kernel must produce, from Python slices and the blake3 package: (count, flags, digests, new_digests)."""
    n = len(offsets)
    flags, differ = bytearray(n), 0
    digests, new_digests = bytearray([SENTINEL]) * (D * n), bytearray([SENTINEL]) * (D * n)
    for i, (off, size) in enumerate(zip(offsets, sizes)):
        sa, sb = a[off:off + size], b[off:off + size]
        f = DIFFERS if sa != sb else 0
        differ += f
        if size <= hash_max:
            f |= HASHED
            digests[D * i:D * (i + 1)] = oracle(sa)
            if sa != sb:
                new_digests[D * i:D * (i + 1)] = oracle(sb)
        flags[i] = f
    return differ, flags, digests, new_digests


def outputs(n: int):
    """Flags, digests and new digests prefilled with a sentinel, so that bytes the kernel must leave alone are
    checked too."""
    return bytearray([SENTINEL]) * n, bytearray([SENTINEL]) * (D * n), bytearray([SENTINEL]) * (D * n)


SIZES = [0, 1, 64, 1000, 5000]


def make_run(seed: int, sizes=SIZES, gap: int = 5):
    """Two byte strings holding each size twice (once equal, once one byte apart), with gaps between tensors."""
    rnd = random.Random(seed)
    offsets, tensor_sizes, off = [], [], gap
    for size in sizes:
        for _ in range(2):
            offsets.append(off)
            tensor_sizes.append(size)
            off += size + gap
    a = bytearray(rnd.randbytes(off))
    b = bytearray(a)
    for i in range(1, len(offsets), 2):  # every second tensor differs in one byte
        if tensor_sizes[i]:
            b[offsets[i] + rnd.randrange(tensor_sizes[i])] ^= 1 << rnd.randrange(8)
    return bytes(a), bytes(b), offsets, tensor_sizes


@pytest.fixture
def write_file(tmp_path):
    fds = []

    def write(data: bytes, lead: int = 0) -> int:
        """A file of lead filler bytes, then data; returns a descriptor open for reading."""
        path = tmp_path / f"f{len(fds)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        os.write(fd, b"\xee" * lead + data)
        return fd

    yield write
    for fd in fds:
        os.close(fd)


def as_int64(values) -> array:
    return array("q", values)


@pytest.mark.parametrize("hash_max", [-1, 0, 1, 64, 999, 1000, 4999, 5000, 1 << 40])
def test_compare_run_against_python(write_file, hash_max):
    a, b, offsets, sizes = make_run(1)
    span = len(a)
    fd_a, fd_b = write_file(a, lead=17), write_file(b, lead=4096 + 3)
    buf_a, buf_b = mmap.mmap(-1, span + 100), mmap.mmap(-1, span)
    out = outputs(len(offsets))
    got = ck.compare_run(fd_a, 17, fd_b, 4096 + 3, span, buf_a, buf_b, as_int64(offsets), as_int64(sizes),
                         hash_max, *out)
    want, *want_out = expected(a, b, offsets, sizes, hash_max)
    assert got == want == 4  # the one-byte edits; the size-0 pair cannot differ
    assert list(out) == want_out
    assert buf_a[:span] == a and buf_b[:span] == b


def test_compare_run_identical_run(write_file):
    a, _b, offsets, sizes = make_run(2)
    fd_a, fd_b = write_file(a), write_file(a)
    buf_a, buf_b = mmap.mmap(-1, len(a)), mmap.mmap(-1, len(a))
    out = outputs(len(offsets))
    assert ck.compare_run(fd_a, 0, fd_b, 0, len(a), buf_a, buf_b, as_int64(offsets), as_int64(sizes), 1 << 20,
                          *out) == 0
    assert out[0] == bytearray([HASHED]) * len(offsets)
    assert out[2] == bytearray([SENTINEL]) * (D * len(offsets))  # no new side where nothing differs
    assert (0, *out) == expected(a, a, offsets, sizes, 1 << 20)


def test_compare_run_many_tiny_tensors(write_file):
    """A long run of 64-byte tensors, one in ten changed: the case the kernel exists for."""
    rnd = random.Random(3)
    n, size = 4096, 64
    a = rnd.randbytes(n * size)
    b = bytearray(a)
    for i in rnd.sample(range(n), n // 10):
        b[i * size + rnd.randrange(size)] ^= 0x80
    b = bytes(b)
    offsets, sizes = list(range(0, n * size, size)), [size] * n
    fd_a, fd_b = write_file(a), write_file(b)
    buf_a, buf_b = mmap.mmap(-1, len(a)), mmap.mmap(-1, len(a))
    out = outputs(n)
    got = ck.compare_run(fd_a, 0, fd_b, 0, len(a), buf_a, buf_b, as_int64(offsets), as_int64(sizes), size,
                         *out)
    assert (got, *out) == expected(a, b, offsets, sizes, size)
    assert got == n // 10


def test_compare_run_takes_raw_native_int64_bytes(write_file):
    a, b, offsets, sizes = make_run(4)
    fd_a, fd_b = write_file(a), write_file(b)
    buf_a, buf_b = bytearray(len(a)), bytearray(len(a))
    out = outputs(len(offsets))
    got = ck.compare_run(fd_a, 0, fd_b, 0, len(a), buf_a, buf_b, as_int64(offsets).tobytes(),
                         memoryview(as_int64(sizes)).cast("B"), 2000, *out)
    assert (got, *out) == expected(a, b, offsets, sizes, 2000)


def test_compare_run_no_tensors_and_empty_span(write_file):
    fd = write_file(b"")
    out = outputs(0)
    assert ck.compare_run(fd, 0, fd, 0, 0, bytearray(), bytearray(), b"", b"", 100, *out) == 0
    # Empty tensors in an empty span: equal, and hashed as the empty input.
    out = outputs(2)
    assert ck.compare_run(fd, 0, fd, 0, 0, bytearray(), bytearray(), as_int64([0, 0]), as_int64([0, 0]), 0,
                          *out) == 0
    assert (0, *out) == expected(b"", b"", [0, 0], [0, 0], 0)


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("short_by", [1, 1000])
def test_compare_run_short_file(write_file, side, short_by):
    a, b, offsets, sizes = make_run(5)
    span = len(a)
    fd_a = write_file(a[:span - short_by] if side == "a" else a)
    fd_b = write_file(b[:span - short_by] if side == "b" else b)
    buf_a, buf_b = mmap.mmap(-1, span), mmap.mmap(-1, span)
    out = outputs(len(offsets))
    assert ck.compare_run(fd_a, 0, fd_b, 0, span, buf_a, buf_b, as_int64(offsets), as_int64(sizes), 1 << 20,
                          *out) == -1


def test_compare_run_position_past_the_end(write_file):
    a, b, offsets, sizes = make_run(6)
    fd_a, fd_b = write_file(a), write_file(b)
    buf = bytearray(len(a))
    out = outputs(len(offsets))
    assert ck.compare_run(fd_a, 1 << 40, fd_b, 0, len(a), buf, bytearray(len(a)), as_int64(offsets),
                          as_int64(sizes), 0, *out) == -1


def test_compare_run_bad_descriptor(write_file, tmp_path):
    a, b, offsets, sizes = make_run(7)
    fd_b = write_file(b)
    closed = os.open(tmp_path / "closed", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(closed)
    out = outputs(len(offsets))
    args = (len(a), bytearray(len(a)), bytearray(len(a)), as_int64(offsets), as_int64(sizes), 100, *out)
    with pytest.raises(OSError) as err:
        ck.compare_run(closed, 0, fd_b, 0, *args)
    assert err.value.errno == 9  # EBADF
    with pytest.raises(OSError):
        ck.compare_run(fd_b, 0, -1, 0, *args)
    directory = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            ck.compare_run(fd_b, 0, directory, 0, *args)
    finally:
        os.close(directory)


BAD_TENSORS = [
    ([-1], [1]),                   # negative offset
    ([0], [-1]),                   # negative size
    ([0], [101]),                  # past the span
    ([100], [1]),                  # starts at the end
    ([101], [0]),                  # empty, but starts past the end
    ([2 ** 62], [2 ** 62]),        # the end overflows int64 if added
    ([50], [2 ** 63 - 1]),
    ([2 ** 63 - 1], [2 ** 63 - 1]),
    ([-2 ** 63], [2 ** 63 - 1]),
    ([0, 10, 2 ** 62], [5, 5, 5]),  # a bad tensor after good ones
]


@pytest.mark.parametrize("offsets, sizes", BAD_TENSORS)
def test_bad_offsets_and_sizes_raise(write_file, offsets, sizes):
    data = pattern(100)
    fd = write_file(data)
    out = outputs(len(offsets))
    with pytest.raises(ValueError):
        ck.compare_run(fd, 0, fd, 0, 100, bytearray(100), bytearray(100), as_int64(offsets), as_int64(sizes),
                       1 << 20, *out)
    with pytest.raises(ValueError):
        ck.compare_buffers(data, data, as_int64(offsets), as_int64(sizes), 1 << 20, *out)
    # The span of compare_buffers is the shorter buffer.
    with pytest.raises(ValueError):
        ck.compare_buffers(data, data[:50], as_int64([40]), as_int64([20]), 1 << 20, *outputs(1))


@pytest.mark.parametrize("offsets, sizes", [
    (b"\0" * 7, b"\0" * 7),      # not whole int64s
    (b"\0" * 8, b"\0" * 16),     # different counts
    (as_int64([0, 1]), as_int64([1])),
])
def test_malformed_offset_arrays_raise(offsets, sizes):
    with pytest.raises(ValueError):
        ck.compare_buffers(b"abc", b"abc", offsets, sizes, 10, *outputs(2))


def test_small_buffers_raise(write_file):
    a, b, offsets, sizes = make_run(8)
    span, n = len(a), len(offsets)
    fd_a, fd_b = write_file(a), write_file(b)
    offs, szs = as_int64(offsets), as_int64(sizes)

    def run(buf_a, buf_b, flags, digests, new_digests, span=span):
        return ck.compare_run(fd_a, 0, fd_b, 0, span, buf_a, buf_b, offs, szs, 1 << 20, flags, digests, new_digests)

    big = bytearray(span)
    assert run(big, bytearray(span), *outputs(n)) == 4
    with pytest.raises(ValueError):
        run(bytearray(span - 1), big, *outputs(n))
    with pytest.raises(ValueError):
        run(big, mmap.mmap(-1, span - 1), *outputs(n))
    with pytest.raises(ValueError):
        run(big, bytearray(span), bytearray(n - 1), bytearray(D * n), bytearray(D * n))
    with pytest.raises(ValueError):
        run(big, bytearray(span), bytearray(n), bytearray(D * n - 1), bytearray(D * n))
    with pytest.raises(ValueError):
        run(big, bytearray(span), bytearray(n), bytearray(D * n), bytearray(D * n - 1))
    with pytest.raises(ValueError):
        ck.compare_buffers(a, b, offs, szs, 1 << 20, bytearray(n), bytearray(D * n - 32), bytearray(D * n))
    with pytest.raises(ValueError):
        ck.compare_buffers(a, b, offs, szs, 1 << 20, bytearray(n), bytearray(D * n), bytearray(D * (n - 1)))
    with pytest.raises(TypeError):  # the old signature, without new_digests
        ck.compare_buffers(a, b, offs, szs, 1 << 20, bytearray(n), bytearray(2 * D * n))
    with pytest.raises(ValueError):
        run(big, bytearray(span), *outputs(n), span=-1)
    with pytest.raises(ValueError):
        ck.compare_run(fd_a, -1, fd_b, 0, span, big, bytearray(span), offs, szs, 0, *outputs(n))
    with pytest.raises(ValueError):
        ck.compare_run(fd_a, 0, fd_b, 2 ** 63 - 10, span, big, bytearray(span), offs, szs, 0, *outputs(n))


def test_read_only_buffers_raise_where_written(write_file):
    a, b, offsets, sizes = make_run(9)
    fd = write_file(a)
    offs, szs = as_int64(offsets), as_int64(sizes)
    n = len(offsets)
    with pytest.raises(TypeError):
        ck.compare_run(fd, 0, fd, 0, len(a), bytes(len(a)), bytearray(len(a)), offs, szs, 0, *outputs(n))
    with pytest.raises(TypeError):
        ck.compare_buffers(a, b, offs, szs, 0, bytes(n), bytearray(D * n), bytearray(D * n))
    with pytest.raises(TypeError):
        ck.compare_buffers(a, b, offs, szs, 0, bytearray(n), bytes(D * n), bytearray(D * n))
    with pytest.raises(TypeError):
        ck.compare_buffers(a, b, offs, szs, 0, bytearray(n), bytearray(D * n), bytes(D * n))
    with pytest.raises(TypeError):
        ck.compare_buffers(a, b, offs, [0] * n, 0, *outputs(n))
    assert ck.compare_buffers(a, b, offs, szs, 0, *outputs(n)) == 4  # read-only inputs are fine
    closed = mmap.mmap(-1, len(a))
    closed.close()
    with pytest.raises(ValueError):
        ck.compare_run(fd, 0, fd, 0, len(a), closed, bytearray(len(a)), offs, szs, 0, *outputs(n))


@pytest.mark.parametrize("hash_max", [-1, 64, 1 << 20])
def test_compare_buffers_against_python(hash_max):
    a, b, offsets, sizes = make_run(10)
    out = outputs(len(offsets))
    got = ck.compare_buffers(a, memoryview(b), as_int64(offsets), as_int64(sizes), hash_max, *out)
    assert (got, *out) == expected(a, b, offsets, sizes, hash_max)


def test_compare_buffers_overlapping_tensors_and_unequal_lengths():
    """Tensors may overlap or repeat (the kernel only reads them); the span is the shorter buffer."""
    a = pattern(3000)
    b = bytearray(a) + b"tail"
    b[1500] ^= 1
    offsets, sizes = [0, 0, 1000, 1499, 1501, 2999], [3000, 1500, 1000, 2, 1499, 1]
    out = outputs(len(offsets))
    got = ck.compare_buffers(a, b, as_int64(offsets), as_int64(sizes), 1 << 20, *out)
    assert (got, *out) == expected(a, bytes(b), offsets, sizes, 1 << 20)
    assert got == 3  # the whole, the range 1000..2000 and the pair at 1499


def test_concurrent_runs_in_threads(write_file):
    """The GIL is released from the reads through the hashing: threads must not share anything."""
    runs = []
    for seed in (11, 12):
        a, b, offsets, sizes = make_run(seed, sizes=[0, 1, 64, 1000, 5000, 3000, 64, 64])
        runs.append((write_file(a), write_file(b), len(a), as_int64(offsets), as_int64(sizes),
                     expected(a, b, offsets, sizes, 4096)))
    failures = []

    def work(fd_a, fd_b, span, offs, szs, want):
        buf_a, buf_b = mmap.mmap(-1, span), mmap.mmap(-1, span)
        for _ in range(200):
            out = outputs(len(offs))
            got = ck.compare_run(fd_a, 0, fd_b, 0, span, buf_a, buf_b, offs, szs, 4096, *out)
            if (got, *out) != want:
                failures.append(got)
                return

    threads = [threading.Thread(target=work, args=run) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# ---------------------------------------------------------------------------
# Tensors hashed side by side: equal-sized tensors of a run share the lanes


def kernel_digests(data: bytes, offsets, sizes, hash_max: int = 1 << 62) -> list[bytes]:
    """compare_buffers on identical sides: the old-side digest of each tensor."""
    out = outputs(len(offsets))
    assert ck.compare_buffers(data, data, as_int64(offsets), as_int64(sizes), hash_max, *out) == 0
    assert out[2] == bytearray([SENTINEL]) * (D * len(offsets))
    return [bytes(out[1][D * i:D * (i + 1)]) for i in range(len(offsets))]


def test_equal_sized_tensors_every_length_up_to_four_chunks(level):
    """Every length 0..4200 as 2 to 8 tensors of that size, each of its own bytes (the lanes must not mix)."""
    data = pattern(4200 + 8 * 7)
    for n in range(4201):
        count = 2 + n % 7
        offsets = [7 * k for k in range(count)]
        want = [oracle(data[o:o + n]) for o in offsets]
        assert kernel_digests(data, offsets, [n] * count) == want, n


@pytest.mark.parametrize("count", list(range(1, 18)))
def test_equal_sized_tensors_every_count(level, count):
    """1 to 17 tensors of one size: full groups of lanes, part-filled ones and single tensors."""
    rnd = random.Random(count)
    for size in (0, 1, 64, 1000, 1024, 5000, 10_700, 64 * 1024):
        data = rnd.randbytes(size * count)
        offsets = [size * k for k in range(count)]
        want = [oracle(data[o:o + size]) for o in offsets]
        assert kernel_digests(data, offsets, [size] * count) == want, size


@pytest.mark.parametrize("count", [8, 16])
def test_equal_sized_tensors_around_whole_chunk_counts(level, count):
    """k * 1024 - 1, k * 1024, k * 1024 + 1 for k to 70: both sides of the longest side-by-side size (64 KiB)."""
    rnd = random.Random(5)
    for k in range(1, 71):
        for size in (k * 1024 - 1, k * 1024, k * 1024 + 1):
            data = rnd.randbytes(size * count)
            offsets = [size * i for i in range(count)]
            want = [oracle(data[o:o + size]) for o in offsets]
            assert kernel_digests(data, offsets, [size] * count) == want, size


def test_interleaved_sizes_and_changed_tensors(level):
    """More distinct sizes than groups kept open, interleaved, some tensors changed: old and new digests."""
    rnd = random.Random(6)
    kinds = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 3000, 4096, 10_700, 16_384, 65_535, 65_536, 65_537,
             100_000, 64, 777]
    sizes = [kinds[i % len(kinds)] for i in range(5 * len(kinds))] + [rnd.choice(kinds) for _ in range(200)]
    offsets, off = [], 0
    for size in sizes:
        offsets.append(off)
        off += size + rnd.randrange(3)
    a = rnd.randbytes(off)
    b = bytearray(a)
    for i in rnd.sample(range(len(sizes)), len(sizes) // 3):
        if sizes[i]:
            b[offsets[i] + rnd.randrange(sizes[i])] ^= 0x10
    b = bytes(b)
    out = outputs(len(sizes))
    got = ck.compare_buffers(a, b, as_int64(offsets), as_int64(sizes), 1 << 62, *out)
    assert (got, *out) == expected(a, b, offsets, sizes, 1 << 62)
    assert got > 0


def test_random_tensor_sizes_up_to_three_mib(level):
    rnd = random.Random(7)
    sizes = [rnd.randrange(3 << 20) for _ in range(3)] + [rnd.randrange(70_000) for _ in range(40)]
    sizes += [rnd.choice([2048, 4096]) for _ in range(20)]
    rnd.shuffle(sizes)
    offsets, off = [], 0
    for size in sizes:
        offsets.append(off)
        off += size
    a = rnd.randbytes(off)
    b = bytearray(a)
    for i in range(0, len(sizes), 2):
        if sizes[i]:
            b[offsets[i] + sizes[i] - 1] ^= 1
    b = bytes(b)
    out = outputs(len(sizes))
    got = ck.compare_buffers(a, b, as_int64(offsets), as_int64(sizes), 1 << 62, *out)
    assert (got, *out) == expected(a, b, offsets, sizes, 1 << 62)


def test_levels_agree_in_threads(write_file):
    """Runs hashed in threads at once, each level in turn; the level is read once per call."""
    sizes = [0, 1, 64, 64, 64, 1000, 5000, 5000, 3000, 64, 10_700, 10_700, 10_700, 200_000]
    runs = []
    for seed in (13, 14):
        a, b, offsets, szs = make_run(seed, sizes=sizes)
        runs.append((write_file(a), write_file(b), len(a), as_int64(offsets), as_int64(szs),
                     expected(a, b, offsets, szs, 1 << 62)))
    failures = []

    def work(fd_a, fd_b, span, offs, szs, want):
        buf_a, buf_b = mmap.mmap(-1, span), mmap.mmap(-1, span)
        for _ in range(30):
            out = outputs(len(offs))
            got = ck.compare_run(fd_a, 0, fd_b, 0, span, buf_a, buf_b, offs, szs, 1 << 62, *out)
            if (got, *out) != want:
                failures.append(got)
                return

    for lvl in LEVELS:
        previous = ck._set_simd(lvl)
        try:
            threads = [threading.Thread(target=work, args=run) for run in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            ck._set_simd(previous)
    assert not failures


def test_equal_compares_ranges_of_two_buffers_and_refuses_ranges_outside_them():
    a = bytearray(b"abcdefgh" * 20000)
    b = bytearray(a)
    b[100_000] ^= 1
    assert ck.equal(a, b, 0, 100_000) is True
    assert ck.equal(a, b, 0, 100_001) is False
    assert ck.equal(a, b, 100_001, len(a) - 100_001) is True
    assert ck.equal(memoryview(a)[8:], memoryview(b)[8:], 0, 0) is True
    for start, n in ((-1, 1), (0, -1), (len(a), 1), (1, len(a)), (2**62, 2**62)):
        with pytest.raises(ValueError):
            ck.equal(a, b, start, n)
    with pytest.raises(TypeError):
        ck.equal(a, 12, 0, 1)


# ---------------------------------------------------------------------------
# the heap setting the CLI makes

_HEAP_PROBE = """
import sys
import ckptdiff._ckernel as ck
if sys.argv[1] == "fix":
    assert ck.fix_mmap_threshold() is True
big = bytearray(16 << 20)
del big  # a mapped 16 MiB block freed: glibc's dynamic threshold rises to 16 MiB
keep, blocks = [], []
for _ in range(48):
    blocks.append(bytearray(1 << 20))  # touched (zero-filled) megabytes ...
    keep.append(bytearray(64 << 10))   # ... each pinned below the next by a small block that stays
del blocks
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmRSS")))
"""


@pytest.mark.skipif(os.uname().sysname != "Linux" or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's allocator")
def test_fix_mmap_threshold_gives_freed_megabytes_back():
    import subprocess
    import sys

    def rss_kb(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], check=True, capture_output=True,
                                  text=True).stdout)

    # Without it, the 48 freed megabytes stay in the heap's holes; with it, each was its own mapping.
    assert rss_kb("default") - rss_kb("fix") > 32 << 10
