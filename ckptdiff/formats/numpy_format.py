"""NumPy ``.npy`` and ``.npz`` files, never with ``allow_pickle``.

The ``.npy`` header is parsed with numpy's own safe helpers
(``read_magic`` / ``read_array_header_*``: a literal-eval parser with a
capped header size), the data length is checked against the file before
anything is mapped, and object/structured dtypes are refused.

``.npz`` members stored uncompressed (``np.savez``) are mapped in place at
their data offset, zero copy. Compressed members (``np.savez_compressed``)
are streamed in bounded pieces and their byte count checked, so a lying
header or a zip bomb costs an error, not memory.

Reference: ``numpy.load`` (``allow_pickle=False``). Stricter: object arrays
and untyped void members are refused; each member's .npy header must agree
with the zip's size for it before anything is inflated (the header is read
from the first bytes of the stream); a compressed member that would inflate
beyond 64 MiB and more than 100-fold (a deflate bomb; real weights compress
about 1.1-fold) is refused from the zip directory alone; a name listed twice
is refused (numpy keeps one).

Note: bfloat16/float8 arrays (ml_dtypes) lose their type in .npy (numpy
writes them as anonymous ``V2``/``V1`` void); such members are refused with a
message saying so, since guessing the type would be wrong.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npformat

from ..checkpoint import Checkpoint, TensorRef, check_shape
from ..dtypes import DType, from_numpy
from ..errors import CkptError, FormatError
from ._common import le_bytes, map_file, numel, open_binary, pread_into, slabs, with_path

NPY_FORMAT = "npy"
NPZ_FORMAT = "npz"
#: numpy's own default limit for header size (it guards literal_eval).
MAX_NPY_HEADER = 10000
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader layout
_READ_PIECE = 1 << 20
#: Compressed members that would inflate to more than this and more than MAX_INFLATE_RATIO times
#: their compressed size are refused (trained weights compress ~1.1-fold; zeros ~1000-fold).
MAX_BOMB_BYTES = 64 << 20
MAX_INFLATE_RATIO = 100


class _Header:
    """What a .npy header says, validated."""

    def __init__(self, dtype: DType, shape: tuple[int, ...], fortran: bool, swap: bool, data_offset: int) -> None:
        self.dtype, self.shape, self.fortran, self.swap, self.data_offset = dtype, shape, fortran, swap, data_offset

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize

    @property
    def zero_copy(self) -> bool:
        """True when the stored bytes already are little-endian C order."""
        return not self.swap and (not self.fortran or sum(s > 1 for s in self.shape) <= 1)


def _read_header(f: BinaryIO, name: str, where: str) -> _Header:
    """Parse a .npy header from ``f`` (positioned at the magic); ``where`` names it in errors."""
    start = f.tell()
    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
        else:
            raise FormatError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
    except CkptError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise FormatError(f"{where}: corrupt data ({_oneline(e)})") from None
    except Exception as e:  # numpy's parser raises ValueError, SyntaxError, TokenError, ... on junk
        raise FormatError(f"{where}: corrupt .npy header ({_oneline(e)})") from None
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise FormatError(f"{where}: object dtype arrays need pickle, which ckptdiff never loads")
    if dt.kind == "V" and dt.fields is None and dt.subdtype is None and dt.itemsize in (1, 2):
        raise FormatError(
            f"{where}: untyped void dtype {dt.str} (bfloat16/float8 arrays lose their type in .npy; "
            "use safetensors, .pt or .h5 for them)")
    try:
        canon = from_numpy(dt)
        shape = check_shape(name, shape)
    except CkptError as e:
        raise FormatError(f"{where}: {e.message}") from None
    swap = dt.itemsize > 1 and dt.byteorder == ">"  # '=' and '|' are native/none on a LE host
    return _Header(canon, shape, bool(fortran), swap, f.tell() - start)


def _oneline(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def open_npy(path: str | os.PathLike[str]) -> Checkpoint:
    p = os.fspath(path)
    with open_binary(p) as f:
        try:
            hdr = _read_header(f, "array", "header")
        except CkptError as e:
            raise with_path(e, p) from None
        size = os.fstat(f.fileno()).st_size
        have = size - hdr.data_offset
        if have < hdr.nbytes:
            raise FormatError(
                f"truncated: header says {hdr.dtype.name} {list(hdr.shape)} = {hdr.nbytes} bytes of data, "
                f"file holds {have}", p)
        mm = map_file(f, p) if hdr.nbytes else None
        fd = os.dup(f.fileno()) if mm is not None else None  # for read_into (pread)
    name = os.path.splitext(os.path.basename(p))[0] or "array"
    ref = _ref(name, hdr, mm, hdr.data_offset, os.path.basename(p), fd)
    ckpt = Checkpoint(p, NPY_FORMAT, {name: ref}, {})
    _close_later(ckpt, mm, fd)
    return ckpt


def _close_later(ckpt: Checkpoint, mm: mmap.mmap | None, fd: int | None) -> None:
    if mm is not None:
        ckpt.on_close(mm.close)
    if fd is not None:
        ckpt.on_close(lambda: os.close(fd))


def _ref(name: str, hdr: _Header, mm: mmap.mmap | None, offset: int, source: str,
         fd: int | None = None) -> TensorRef:
    """A TensorRef over bytes at ``offset`` of a mapping (None when the array is empty).

    Bytes that are already little-endian C order are a zero-copy view (plus a
    pread-based ``read_into`` when ``fd`` is given); anything else is
    converted slab by slab.
    """
    if mm is None:
        return TensorRef(name, hdr.dtype.name, hdr.shape, view=lambda: memoryview(b""), source=source)
    if hdr.zero_copy:
        end = offset + hdr.nbytes

        def view() -> memoryview:
            return memoryview(mm)[offset:end]
        reader = pread_into(fd, offset, end) if fd is not None else None
        return TensorRef(name, hdr.dtype.name, hdr.shape, view=view, source=source, read_into=reader,
                         file_span=(fd, offset) if fd is not None else None)

    def pieces() -> Iterator[memoryview]:
        stored = hdr.dtype.np_dtype.newbyteorder(">" if hdr.swap else "<")
        arr = np.frombuffer(mm, dtype=stored, count=numel(hdr.shape), offset=offset)
        arr = arr.reshape(hdr.shape, order="F" if hdr.fortran else "C")
        for sel in slabs(hdr.shape, hdr.dtype.itemsize):
            yield le_bytes(arr[sel], hdr.dtype.np_dtype)
    return TensorRef(name, hdr.dtype.name, hdr.shape, pieces=pieces, source=source)


def open_npz(path: str | os.PathLike[str]) -> Checkpoint:
    p = os.fspath(path)
    f = open_binary(p)
    try:
        return _open_npz(f, p)
    finally:
        f.close()


def _open_npz(f: BinaryIO, p: str) -> Checkpoint:
    size = os.fstat(f.fileno()).st_size
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise FormatError(f"corrupt zip archive ({_oneline(e)})", p) from None
    mm = map_file(f, p)
    fd = os.dup(f.fileno()) if mm is not None else None  # for read_into (pread) of stored members
    tensors: dict[str, TensorRef] = {}
    try:
        for info in infos:
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise FormatError(f"member {info.filename!r} is not a .npy array", p)
            name = info.filename[: -len(".npy")]
            if name in tensors:
                raise FormatError(f"member {info.filename!r} appears twice in the archive", p)
            if info.flag_bits & 0x1:
                raise FormatError(f"member {info.filename!r} is encrypted", p)
            try:
                if info.compress_type == zipfile.ZIP_STORED:
                    tensors[name] = _stored_member(f, mm, size, info, name, p, fd)
                else:
                    tensors[name] = _compressed_member(p, info, name)
            except (OSError, ValueError, EOFError, NotImplementedError, struct.error, zipfile.BadZipFile,
                    zlib.error) as e:
                raise FormatError(f"member {info.filename!r}: corrupt ({_oneline(e)})", p) from None
    except BaseException:
        if mm is not None:
            mm.close()
        if fd is not None:
            os.close(fd)
        raise
    ckpt = Checkpoint(p, NPZ_FORMAT, tensors, {})
    _close_later(ckpt, mm, fd)
    return ckpt


def _stored_member(f: BinaryIO, mm: mmap.mmap | None, size: int, info: zipfile.ZipInfo, name: str,
                   p: str, fd: int | None = None) -> TensorRef:
    where = f"member {info.filename!r}"
    if info.header_offset < 0 or info.header_offset + _LOCAL_HEADER.size > size:
        raise FormatError(f"{where}: local header lies past the end of the file (truncated?)", p)
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        raise FormatError(f"{where}: bad local file header", p)
    start = info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
    if info.compress_size != info.file_size:
        raise FormatError(f"{where}: stored member with different sizes ({info.compress_size} vs {info.file_size})", p)
    if start + info.file_size > size:
        raise FormatError(f"{where}: data runs past the end of the file (truncated?)", p)
    f.seek(start)
    try:
        hdr = _read_header(f, name, where)
    except CkptError as e:
        raise with_path(e, p) from None
    have = info.file_size - hdr.data_offset
    if have != hdr.nbytes:
        raise FormatError(
            f"{where}: header says {hdr.nbytes} bytes of data, the member holds {have}", p)
    return _ref(name, hdr, mm if hdr.nbytes else None, start + hdr.data_offset, info.filename, fd)


def _compressed_member(p: str, info: zipfile.ZipInfo, name: str) -> TensorRef:
    where = f"member {info.filename!r}"
    with _member_stream(p, info) as stream:
        try:
            hdr = _read_header(stream, name, where)
        except CkptError as e:
            raise with_path(e, p) from None
    if info.file_size - hdr.data_offset != hdr.nbytes:
        raise FormatError(
            f"{where}: header says {hdr.nbytes} bytes of data, the zip entry claims {info.file_size - hdr.data_offset}",
            p)
    if info.file_size > MAX_BOMB_BYTES and info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1):
        # From the zip's own numbers, before the data is inflated (only the header was).
        raise FormatError(
            f"{where}: {info.compress_size:,} compressed bytes claim to inflate to {info.file_size:,} "
            f"(more than {MAX_INFLATE_RATIO}-fold and over {MAX_BOMB_BYTES >> 20} MiB: a deflate bomb?); "
            "ckptdiff refuses such members (save real weights with np.savez, or as safetensors)", p)
    return TensorRef(name, hdr.dtype.name, hdr.shape, pieces=_stream_pieces(p, info, hdr, where),
                     source=info.filename)


class _member_stream:
    """Open one zip member as a stream, with zip errors turned into FormatError."""

    def __init__(self, p: str, info: zipfile.ZipInfo) -> None:
        self.p, self.info = p, info

    def __enter__(self) -> Any:
        self.f = open_binary(self.p)
        try:
            self.zf = zipfile.ZipFile(self.f)
            return self.zf.open(self.info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, ValueError, EOFError,
                zlib.error) as e:
            self.f.close()
            raise FormatError(f"member {self.info.filename!r}: cannot open ({e})", self.p) from None

    def __exit__(self, *exc: object) -> None:
        self.zf.close()
        self.f.close()


def _stream_pieces(p: str, info: zipfile.ZipInfo, hdr: _Header, where: str) -> Callable[[], Iterator[memoryview]]:
    def raw() -> Iterator[bytes]:
        """The member's data bytes, exactly hdr.nbytes of them, CRC-checked at the end."""
        with _member_stream(p, info) as stream:
            try:
                stream.read(hdr.data_offset)
                left = hdr.nbytes
                while left:
                    piece = stream.read(min(_READ_PIECE, left))
                    if not piece:
                        raise FormatError(f"{where}: compressed data ends {left} bytes early", p)
                    left -= len(piece)
                    yield piece
                if stream.read(1):
                    raise FormatError(f"{where}: more data than the header says", p)
            except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, NotImplementedError) as e:
                raise FormatError(f"{where}: corrupt compressed data ({_oneline(e)})", p) from None

    def pieces() -> Iterator[memoryview]:
        if hdr.zero_copy:
            for piece in raw():
                yield memoryview(piece)
        elif not hdr.fortran or sum(s > 1 for s in hdr.shape) <= 1:
            yield from _swapped(raw(), hdr)
        else:
            yield from _via_spool(raw(), hdr)
    return pieces


def _swapped(raw: Iterator[bytes], hdr: _Header) -> Iterator[memoryview]:
    """Big-endian C-order stream -> little-endian, piece by piece on element boundaries."""
    item = hdr.dtype.itemsize
    stored = hdr.dtype.np_dtype.newbyteorder(">")
    carry = b""
    for piece in raw:
        buf = carry + piece
        cut = len(buf) - len(buf) % item
        carry = buf[cut:]
        if cut:
            yield le_bytes(np.frombuffer(buf[:cut], dtype=stored), hdr.dtype.np_dtype)
    # _rechunk checks the total, so a trailing partial element cannot slip through.


def _via_spool(raw: Iterator[bytes], hdr: _Header) -> Iterator[memoryview]:
    """Fortran order needs random access: spool to a temp file, then re-read it in C-order slabs."""
    with tempfile.TemporaryFile(prefix="ckptdiff-npz-") as tmp:
        for piece in raw:
            tmp.write(piece)
        tmp.flush()
        mm = mmap.mmap(tmp.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            stored = hdr.dtype.np_dtype.newbyteorder(">" if hdr.swap else "<")
            arr = np.frombuffer(mm, dtype=stored, count=numel(hdr.shape)).reshape(hdr.shape, order="F")
            for sel in slabs(hdr.shape, hdr.dtype.itemsize):
                yield le_bytes(arr[sel], hdr.dtype.np_dtype)
            del arr
        finally:
            try:
                mm.close()
            except BufferError:
                pass

