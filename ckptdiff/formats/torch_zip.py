"""A torch-free fast path for zip-format .pt files (what ``torch.save`` writes).

Why: ``import torch`` alone costs about a second, more than diffing a 1 GB
checkpoint. Most training checkpoints are plain nested dicts of dense
tensors, and the zip format is simple: ``<archive>/data.pkl`` is a pickle
whose tensors point, by a persistent id, at uncompressed ``<archive>/data/<key>``
members holding the raw little-endian bytes. This module maps the file once
and hands out zero-copy views of those members (plus ``read_into``, a pread
on its own descriptor, for streaming), exactly like the safetensors reader.

Reference and rule: ``torch.load(weights_only=True)``. The bytes this module
hands out are the bytes torch would load, or the file is refused (one line,
exit 2), or the file is handed to torch itself (:class:`Unsupported`).

* The zip is checked before anything is read: every member stored
  (uncompressed, unencrypted), names unique, the local header agreeing with
  the central directory (name, method, sizes), members laid end to end from
  byte 0 with nothing before, between or after them but the central
  directory, and one ``<archive>/data.pkl`` where torch looks for it (under
  the first member's folder). Stricter than torch, which tolerates some of
  these and then reads a different member than a zip library would.
* The pickle is interpreted by :mod:`.safe_pickle` (torch's weights-only
  opcodes and rules, plus bounds on memo, depth and integers). Globals map to
  fresh stand-ins made for this one load; nothing from the file is imported
  or called, and nothing outlives the load, so one file cannot change how
  the next is read.
* Tensors are validated as ``torch._utils._rebuild_tensor_v2/v3`` and
  ``Tensor.set_`` would validate them: known dtype, non-negative sizes and
  offset, C-contiguous strides, the bytes inside the storage, and each
  storage exactly the size of its ``data/<key>`` member (stricter: torch's
  mmap path would read past a short member).
* Anything the stand-ins do not model (other globals, BUILD on a tensor,
  conj/neg bits, ``requires_grad`` on an integer tensor, untyped storages
  without a dtype, non-contiguous views, a byteorder other than ``little``)
  raises :class:`Unsupported` after the whole stream has been validated, and
  torch's own weights-only loader decides; ckptdiff then compares the
  tensors torch returned.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO

from ..checkpoint import Checkpoint, TensorRef, check_shape
from ..dtypes import DTYPES, STORAGE_DTYPES, TORCH_NAMES
from ..errors import CkptError, FormatError
from ._common import numel, pread_into
from .safe_pickle import NeedsTorch, Opaque, PickleRefused, safe_unpickle

#: Storage classes torch allows whose elements the dtype table does not hold -> item size.
_OTHER_STORAGES = {"ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QInt32Storage": 4, "QInt8Storage": 1,
                   "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1}
#: data.pkl larger than this is refused (the interpreter is bounded, but minutes are not a diff).
MAX_PICKLE_BYTES = 256 << 20
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory, 22 bytes
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")  # zip64 end of central directory record, 56 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # zip64 end of central directory locator, 20 bytes
#: General-purpose flags torch.save writes (data descriptor, UTF-8 names); any other (encryption,
#: masked headers, patches) makes some zip reader read the member differently.
_KNOWN_FLAGS = 0x8 | 0x800
_DOS_DIRECTORY = 0x10


class Unsupported(NeedsTorch):
    """This file needs torch's own loader (not an error in the file)."""


# -- stand-ins: plain value objects, created per load ------------------------------------------

class _StorageType:
    __slots__ = ("dtype", "itemsize")

    def __init__(self, dtype: str | None, itemsize: int = 1) -> None:
        self.dtype = dtype  # None: UntypedStorage (bytes; the tensor carries its dtype) or a type we do not read
        self.itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else itemsize


class _DType:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    __slots__ = ("key", "dtype", "nbytes")

    def __init__(self, key: str, dtype: str | None, nbytes: int) -> None:
        self.key, self.dtype, self.nbytes = key, dtype, nbytes


class PtTensor:
    """A dense tensor found in data.pkl: where its bytes are, not the bytes."""

    __slots__ = ("storage", "offset", "shape", "dtype")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], dtype: str) -> None:
        self.storage, self.offset, self.shape, self.dtype = storage, offset, shape, dtype


def _int(x: Any) -> int:
    if type(x) is not int:
        raise Unsupported(f"expected an int, got {type(x).__name__}")
    return x


def _ints(x: Any) -> tuple[int, ...]:
    if type(x) is not tuple:
        raise Unsupported(f"expected a tuple of ints, got {type(x).__name__}")
    return tuple(_int(v) for v in x)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """C-contiguous, ignoring the stride of size-1 dims (torch does the same)."""
    if len(shape) != len(stride):
        return False
    if numel(shape) == 0:
        return True
    expect = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != expect:
            return False
        expect *= size
    return True


def _plain_flags(requires_grad: Any, backward_hooks: Any, metadata: Any, dtype: str) -> None:
    """The extra rebuild arguments, accepted only where torch would give the plain tensor back."""
    if type(requires_grad) is not bool or (requires_grad and DTYPES[dtype].kind != "float"):
        raise Unsupported("requires_grad torch must judge")
    if backward_hooks is not None and not (type(backward_hooks) in (dict, OrderedDict) and not backward_hooks):
        raise Unsupported("tensor with backward hooks")
    if metadata is not None and not (type(metadata) in (dict, OrderedDict) and not metadata):
        raise Unsupported("tensor with conj/neg metadata")  # torch would flip bits on load


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> PtTensor:
    """What ``Tensor.set_(storage, offset, size, stride)`` accepts, for C-contiguous tensors."""
    if not isinstance(storage, _Storage):
        raise Unsupported("tensor without a storage")
    offset, shape, strides = _int(offset), _ints(size), _ints(stride)
    if dtype is None:
        raise Unsupported("untyped storage without a dtype")  # torch reads it as uint8
    if dtype not in DTYPES:
        raise Unsupported(f"dtype {dtype}")
    if offset < 0 or any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise Unsupported("negative offset, size or stride")
    if not _contiguous(shape, strides):
        raise Unsupported("non-contiguous tensor")
    n = numel(shape)
    if n and (offset + n) * DTYPES[dtype].itemsize > storage.nbytes:
        raise Unsupported("tensor larger than its storage")  # torch refuses it with its own words
    try:
        shape = check_shape("tensor", shape)
    except CkptError as e:
        raise Unsupported(e.message) from None
    return PtTensor(storage, offset, shape, dtype)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> PtTensor:
    t = _rebuild(storage, storage_offset, size, stride, getattr(storage, "dtype", None))
    _plain_flags(requires_grad, backward_hooks, metadata, t.dtype)
    return t


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> PtTensor:
    if not isinstance(dtype, _DType):
        raise Unsupported("tensor with an unknown dtype")
    t = _rebuild(storage, storage_offset, size, stride, dtype.name)
    _plain_flags(requires_grad, backward_hooks, metadata, t.dtype)
    return t


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> PtTensor:
    if not isinstance(data, PtTensor):
        raise Unsupported("parameter without a tensor")
    _plain_flags(requires_grad, backward_hooks, None, data.dtype)
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> PtTensor:
    if state is not None and not (type(state) in (dict, OrderedDict) and not state):
        raise Unsupported("parameter with extra state")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _size(dims: Any = ()) -> tuple[int, ...]:
    if type(dims) not in (list, tuple):
        raise Unsupported("torch.Size of something other than a list or tuple")
    return _ints(tuple(dims))


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """pickle protocol 2 spells ``bytes`` as ``_codecs.encode(str, 'latin1')``; nothing else is modelled."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise Unsupported("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    if args:
        raise Unsupported("OrderedDict built from arguments")
    return OrderedDict()


#: Globals the stand-ins model (a subset of torch's weights-only allow-list).
_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): _size,
    ("_codecs", "encode"): _encode,
}


class _Load:
    """The state of one load: storages by key, the archive's members. Never shared."""

    def __init__(self, members: dict[str, tuple[int, int]]) -> None:
        self.members = members
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        hit = _FUNCTIONS.get((module, name))
        if hit is not None:
            return hit  # plain functions: the interpreter never sets attributes on them
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module in ("torch", "torch.cuda") and name in _OTHER_STORAGES:
            # complex and quantized storages: not read here, but their sizes are still checked, because
            # torch's mmap loader would slice past a short member rather than refuse it
            return _StorageType(f"<{name}>", _OTHER_STORAGES[name])
        if module == "torch" and name in TORCH_NAMES:  # dtype globals, as pickled for _rebuild_tensor_v3
            return _DType(TORCH_NAMES[name])
        return Opaque(f"pickle global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        """torch's ``persistent_load`` for zip files: one storage per key, the first reference wins."""
        if not (type(pid) is tuple and len(pid) == 5):
            raise Unsupported("unknown persistent id")
        _tag, stype, key, _location, count = pid
        if not isinstance(stype, _StorageType) or type(key) is not str:
            raise Unsupported("unknown storage type")
        known = self.storages.get(key)
        if known is not None:
            return known  # torch reuses the storage loaded first, whatever this reference says
        count = _int(count)
        itemsize = stype.itemsize
        nbytes = count * itemsize
        member = self.members.get(f"data/{key}")
        if count < 0 or member is None or member[1] != nbytes:
            have = "is missing from the archive" if member is None else f"holds {member[1]} bytes"
            raise PickleRefused(f"storage {key[:80]!r} {have}, the pickle claims {max(count, 0) * itemsize}")
        storage = _Storage(key, stype.dtype, nbytes)
        if nbytes:  # torch does not cache storages without data
            self.storages[key] = storage
        return storage


def _check_storage_alignment(f: BinaryIO, member: tuple[int, int] | None, path: str) -> None:
    """torch parses ``.storage_alignment`` with ``int()`` and refuses the file if it cannot."""
    if member is None:
        return
    f.seek(member[0])
    text = f.read(min(member[1], 64))
    try:
        if member[1] > 64:
            raise ValueError
        int(text)
    except ValueError:
        raise FormatError(".storage_alignment is not a number (torch refuses such a file)", path) from None


def unpickle_data_pkl(raw: bytes, members: dict[str, tuple[int, int]], path: str | None = None) -> Any:
    """A ``torch.save`` data.pkl, read with fresh stand-ins (PtTensor leaves) and safe_pickle's bounds.

    ``members`` is :func:`_member_offsets`'s table (storage sizes are checked
    against it). Raises FormatError to refuse, Unsupported when torch must read it.
    """
    state = _Load(members)
    try:
        obj, opaque, _end = safe_unpickle(raw, state.find_class, state.persistent_load)
    except PickleRefused as e:
        raise FormatError(f"refused: {e}", path) from None
    if opaque:
        raise Unsupported(opaque[0])
    return obj


# -- the archive -------------------------------------------------------------------------------

def _check_end_records(f: BinaryIO, size: int, start_dir: int, count: int, path: str | None) -> int:
    """The central directory is followed by (zip64 end record, zip64 locator,) end record: nothing else,
    and every count, size, offset and disk number in them agrees (miniz, torch's reader, checks each).
    Returns where the central directory ends."""
    if size < _EOCD.size:
        raise FormatError("truncated zip archive", path)
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, comment = _EOCD.unpack(f.read(_EOCD.size))
    if sig != b"PK\x05\x06" or comment != 0:
        raise FormatError("zip archive with bytes after its end record (a comment or appended data)", path)
    cd_end = size - _EOCD.size
    fields = [(disk, 0, 0xFFFF), (cd_disk, 0, 0xFFFF), (n_here, count, 0xFFFF), (n_total, count, 0xFFFF),
              (cd_offset, start_dir, 0xFFFFFFFF)]
    zip64_at = size - _EOCD.size - _ZIP64_LOCATOR.size - _ZIP64_END.size
    if zip64_at >= start_dir:
        f.seek(zip64_at)
        end64 = _ZIP64_END.unpack(f.read(_ZIP64_END.size))
        locator = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
        if end64[0] == b"PK\x06\x06" and locator[0] == b"PK\x06\x07":
            _sig, rec_size, _made, _need, d64, cd_d64, here64, total64, size64, off64 = end64
            if (rec_size, d64, cd_d64, here64, total64, off64) != (44, 0, 0, count, count, start_dir) \
                    or size64 != zip64_at - start_dir or locator[1:] != (0, zip64_at, 1):
                raise FormatError("zip archive whose zip64 end records disagree with its central directory", path)
            cd_end = zip64_at
    fields.append((cd_size, cd_end - start_dir, 0xFFFFFFFF))
    if any(value not in (want, escape) for value, want, escape in fields):
        raise FormatError("zip archive whose end record disagrees with its central directory", path)
    return cd_end


def _check_central_lengths(f: BinaryIO, start: int, end: int, count: int, path: str | None) -> None:
    """Walk the central directory by its own length fields: ``count`` entries, no comments, exactly filling it.

    (zipfile reads a field that runs past the directory as shorter; torch's reader refuses it.)
    """
    f.seek(start)
    raw = f.read(end - start)
    pos = n = 0
    while pos < len(raw):
        if raw[pos:pos + 4] != b"PK\x01\x02" or pos + 46 > len(raw):
            break
        n_name, n_extra, n_comment = struct.unpack_from("<HHH", raw, pos + 28)
        if n_comment:
            break
        pos += 46 + n_name + n_extra
        n += 1
    if pos != len(raw) or n != count:
        raise FormatError("zip central directory whose entries do not fill it exactly", path)


def _well_formed_extra(extra: bytes) -> bool:
    """An extra field made of whole ``(tag, length, data)`` records, as torch's reader parses it."""
    pos = 0
    while pos + 4 <= len(extra):
        pos += 4 + struct.unpack_from("<H", extra, pos + 2)[0]
    return pos == len(extra)


def _member_offsets(f: BinaryIO, size: int, path: str | None) -> tuple[str, dict[str, tuple[int, int]]]:
    """(archive prefix, member name below it -> (absolute data offset, length)), after checking the layout.

    The layout is the one ``torch.save`` writes: members end to end from byte
    0, then the central directory, then the end record with no comment.
    Anything else is refused, so no two zip readers can disagree about
    which bytes a member holds.
    """
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
        start_dir = zf.start_dir
        zf.close()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise FormatError(f"corrupt zip archive ({str(e)[:200]})", path) from None
    if not infos:
        raise FormatError("zip archive without members", path)
    cd_end = _check_end_records(f, size, start_dir, len(infos), path)
    _check_central_lengths(f, start_dir, cd_end, len(infos), path)
    seen: set[str] = set()
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.filename
        if name in seen:
            raise FormatError(f"zip member {name[:200]!r} appears twice", path)
        seen.add(name)
        if info.header_offset != pos:
            where = "before the first member" if pos == 0 else f"between members (at byte {pos})"
            raise FormatError(f"zip archive with {abs(info.header_offset - pos)} unexplained bytes {where}", path)
        if info.volume != 0 or info.flag_bits & ~_KNOWN_FLAGS or info.external_attr & _DOS_DIRECTORY \
                or name.endswith("/") or not _well_formed_extra(info.extra):
            # a DOS directory bit in the attributes makes torch's reader treat the member as a folder
            raise FormatError(f"zip member {name[:200]!r} has flags, attributes or fields torch.save never writes",
                              path)

        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise FormatError(f"zip member {name[:200]!r} is compressed or encrypted; torch.save stores members "
                              "uncompressed", path)
        f.seek(pos)
        head = f.read(_LOCAL.size)
        if len(head) != _LOCAL.size:
            raise FormatError(f"truncated: local header of {name[:200]!r}", path)
        sig, _ver, flags, method, _t, _d, crc, csize, usize, n_name, n_extra = _LOCAL.unpack(head)
        local_name = f.read(n_name)
        try:
            local_text = local_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            local_text = None
        if sig != b"PK\x03\x04" or local_text != info.orig_filename or method != info.compress_type \
                or flags != info.flag_bits:
            raise FormatError(f"zip member {name[:200]!r}: local header disagrees with the central directory", path)
        if not flags & 0x8 and (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size) \
                and (csize, usize) != (0xFFFFFFFF, 0xFFFFFFFF):
            raise FormatError(f"zip member {name[:200]!r}: local sizes disagree with the central directory", path)
        start = pos + _LOCAL.size + n_name + n_extra
        end = start + info.file_size
        if end > start_dir:
            raise FormatError(f"truncated: zip member {name[:200]!r} runs into the central directory", path)
        pos = end
        if info.flag_bits & 0x8:  # a data descriptor follows the data: optional signature, crc, two sizes
            f.seek(end)
            desc = f.read(4)
            pos += 4 if desc == b"PK\x07\x08" else 0
            pos += 20 if info.file_size >= 0xFFFFFFFF else 12
        spans[name] = (start, info.file_size)
    if pos != start_dir:
        raise FormatError(f"zip archive with {abs(start_dir - pos)} unexplained bytes before its central directory",
                          path)
    first = min(infos, key=lambda i: i.header_offset).filename
    if "/" not in first:
        raise FormatError("zip archive whose first member is not in a folder (not written by torch.save)", path)
    prefix = first[: first.index("/") + 1]
    if prefix + "data.pkl" not in spans:
        raise FormatError(f"zip archive without {prefix[:200]}data.pkl", path)
    return prefix, {n[len(prefix):]: span for n, span in spans.items() if n.startswith(prefix)}


def load(path: str) -> tuple[Any, Callable[[PtTensor, str], TensorRef], Callable[[], None]]:
    """Unpickle ``path`` into plain Python objects with :class:`PtTensor` leaves.

    Returns (object, make_ref(tensor, name) -> TensorRef, close). Raises
    :class:`FormatError` for a file to refuse, :class:`Unsupported` when torch
    should read the (fully validated) file instead.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, the mmap outlives it
    except OSError as e:
        raise Unsupported(str(e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        _prefix, members = _member_offsets(f, size, path)
        order = members.get("byteorder")
        little = True
        if order is not None:
            f.seek(order[0])
            little = f.read(min(order[1], 16)) == b"little"
        _check_storage_alignment(f, members.get(".storage_alignment"), path)
        p_start, p_len = members["data.pkl"]
        if p_len > MAX_PICKLE_BYTES:
            raise FormatError(f"data.pkl holds {p_len:,} bytes; ckptdiff reads pickles of up to "
                              f"{MAX_PICKLE_BYTES >> 20} MiB (a state_dict of 100,000 tensors needs ~10)", path)
        f.seek(p_start)
        raw = f.read(p_len)
        obj = unpickle_data_pkl(raw, members, path)  # validates the whole stream, even when torch must read it
        if not little:
            raise Unsupported("not a little-endian archive")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        fd = os.dup(f.fileno())  # for read_into: pread needs no shared file position
    whole = memoryview(mm)
    base = os.path.basename(path)

    def make_ref(t: PtTensor, name: str) -> TensorRef:
        start = members[f"data/{t.storage.key}"][0]  # persistent_load checked it exists with this size
        itemsize = DTYPES[t.dtype].itemsize
        lo = start + t.offset * itemsize
        hi = lo + numel(t.shape) * itemsize  # _rebuild checked it lies inside the storage
        return TensorRef(name, t.dtype, t.shape, view=lambda: whole[lo:hi], source=base,
                         read_into=pread_into(fd, lo, hi), file_span=(fd, lo))

    def close() -> None:
        whole.release()
        mm.close()
        os.close(fd)

    return obj, make_ref, close


def open_torch_zip(path: str, flatten: Callable[..., tuple[Any, ...]],
                   finish: Callable[..., Checkpoint]) -> Checkpoint:
    """Open a zip .pt without torch, with torch_format's naming (``flatten``) and wrapping (``finish``).

    ``flatten(torch_like, obj, path)`` returns ``(tensors, *rest)``;
    ``finish(path, refs, *rest)`` builds the Checkpoint. Sharing those with
    the torch path is what guarantees both paths name, unwrap and describe a
    checkpoint identically.
    """
    obj, make_ref, close = load(path)
    try:
        tensors, *rest = flatten(SHIM, obj, path)
        refs = {name: make_ref(t, name) for name, t in tensors.items()}
        ckpt = finish(path, refs, *rest)
    except BaseException:
        close()
        raise
    ckpt.on_close(close)
    return ckpt


class _Shim:
    """Stands in for the ``torch`` module in torch_format's tree walk: only ``Tensor`` is used."""

    Tensor = PtTensor


SHIM = _Shim()

__all__ = ["SHIM", "Unsupported", "PtTensor", "load", "open_torch_zip", "unpickle_data_pkl"]
