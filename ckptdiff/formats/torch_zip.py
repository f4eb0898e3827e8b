"""A torch-free fast path for zip-format .pt files (what ``torch.save`` writes).

Why: ``import torch`` alone costs about a second, more than diffing a 1 GB
checkpoint. Most training checkpoints are plain nested dicts of dense
tensors, and the zip format is simple: ``<archive>/data.pkl`` is a pickle
whose tensors point, by a persistent id, at uncompressed ``<archive>/data/<key>``
members holding the raw little-endian bytes. This module maps the file once
and hands out zero-copy views of those members (plus ``read_into``, a pread
on its own descriptor, for streaming), exactly like the safetensors reader.

Security: the pickle is read with an unpickler whose ``find_class`` knows a
short allow-list (OrderedDict, the tensor/parameter rebuild functions,
storage and dtype names) and maps each to a harmless stand-in defined here.
Nothing from the file is ever imported or called. Anything outside the
allow-list, and anything unusual (compressed members, big-endian archives,
non-contiguous strides, complex or quantized storages, odd persistent ids),
raises :class:`Unsupported`, and the caller falls back to torch's own
``weights_only`` loader, which then accepts or refuses the file with its
usual messages. The fast path therefore never accepts less safely than
torch would, and never returns something torch would read differently.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..checkpoint import Checkpoint, TensorRef, check_shape
from ..dtypes import DTYPES, STORAGE_DTYPES, TORCH_NAMES
from ..errors import FormatError
from ._common import numel, pread_into, with_path

#: data.pkl larger than this is not a plain state_dict; leave it to torch.
MAX_PICKLE_BYTES = 256 << 20


class Unsupported(Exception):
    """This file needs torch's own loader (not an error in the file)."""


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype  # None: UntypedStorage (bytes; the tensor carries its dtype)


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
    if isinstance(x, bool) or not isinstance(x, int):
        raise Unsupported(f"expected an int, got {type(x).__name__}")
    return x


def _ints(x: Any) -> tuple[int, ...]:
    if not isinstance(x, tuple):
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


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> PtTensor:
    if not isinstance(storage, _Storage):
        raise Unsupported("tensor without a storage")
    offset, shape, strides = _int(offset), _ints(size), _ints(stride)
    dt = dtype or storage.dtype
    if dt is None:
        raise Unsupported("untyped storage without a dtype")
    if not _contiguous(shape, strides) or offset < 0:
        raise Unsupported("non-contiguous tensor")
    shape = check_shape("tensor", shape)
    return PtTensor(storage, offset, shape, dt)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> PtTensor:
    return _rebuild(storage, offset, size, stride, None)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> PtTensor:
    if not isinstance(dtype, _DType):
        raise Unsupported("tensor with an unknown dtype")
    return _rebuild(storage, offset, size, stride, dtype.name)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> PtTensor:
    if not isinstance(data, PtTensor):
        raise Unsupported("parameter without a tensor")
    return data


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(tuple(dims) if isinstance(dims, (list, tuple)) else dims)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """pickle protocol 2 spells ``bytes`` as ``_codecs.encode(str, 'latin1')``; nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Unsupported("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("_codecs", "encode"): _encode,
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    ("torch", "UntypedStorage"): _StorageType(None),
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the allow-list, to stand-ins; everything else means "ask torch"."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        hit = _ALLOWED.get((module, name))
        if hit is not None:
            return hit
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_NAMES:  # dtype globals, as pickled for _rebuild_tensor_v3
            return _DType(TORCH_NAMES[name])
        raise Unsupported(f"pickle global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Unsupported("unknown persistent id")
        _tag, stype, key, _location, count = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise Unsupported("unknown storage type")
        count = _int(count)
        if count < 0:
            raise Unsupported("negative storage size")
        itemsize = 1 if stype.dtype is None else DTYPES[stype.dtype].itemsize
        return _Storage(key, stype.dtype, count * itemsize)


def _member_offsets(zf: zipfile.ZipFile, f: Any, size: int) -> tuple[str, dict[str, tuple[int, int]]]:
    """(archive prefix, member name -> (absolute data offset, length)) for stored members."""
    infos = zf.infolist()
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pkl) != 1:
        raise Unsupported("no single <archive>/data.pkl")
    prefix = pkl[0].filename[: -len("data.pkl")]
    out: dict[str, tuple[int, int]] = {}
    for info in infos:
        if not info.filename.startswith(prefix):
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise Unsupported("compressed or encrypted member")
        f.seek(info.header_offset)
        head = f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(f"corrupt zip: bad local header for {info.filename!r}")
        n_name, n_extra = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + n_name + n_extra
        if start + info.file_size > size:
            raise FormatError(f"truncated: zip member {info.filename!r} runs past the end of the file")
        out[info.filename[len(prefix):]] = (start, info.file_size)
    return prefix, out


def load(path: str) -> tuple[Any, Callable[[PtTensor, str], TensorRef], Callable[[], None]]:
    """Unpickle ``path`` into plain Python objects with :class:`PtTensor` leaves.

    Returns (object, make_ref(tensor, name) -> TensorRef, close). Raises
    :class:`Unsupported` when torch should read the file instead.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, the mmap outlives it
    except OSError as e:
        raise Unsupported(str(e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise Unsupported(f"zip: {e}") from None
        with zf:
            try:
                _prefix, members = _member_offsets(zf, f, size)
            except FormatError as e:
                raise with_path(e, path) from None
            except (OSError, ValueError, struct.error) as e:
                raise Unsupported(f"zip: {e}") from None
        if members.get("byteorder") is not None:
            start, n = members["byteorder"]
            f.seek(start)
            if f.read(min(n, 16)).strip() != b"little":
                raise Unsupported("not a little-endian archive")
        p_start, p_len = members["data.pkl"]
        if p_len > MAX_PICKLE_BYTES:
            raise Unsupported("data.pkl too large for the fast path")
        f.seek(p_start)
        raw = f.read(p_len)
        try:
            obj = _Unpickler(io.BytesIO(raw)).load()
        except Unsupported:
            raise
        except RecursionError:
            raise Unsupported("pickle nested too deeply") from None
        except Exception as e:  # any malformed pickle: torch gives the proper message
            raise Unsupported(f"pickle: {type(e).__name__}: {e}") from None
        if not size:
            raise Unsupported("empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        fd = os.dup(f.fileno())  # for read_into: pread needs no shared file position
    whole = memoryview(mm)
    base = os.path.basename(path)

    def make_ref(t: PtTensor, name: str) -> TensorRef:
        m = members.get(f"data/{t.storage.key}")
        if m is None:
            raise FormatError(f"tensor {name!r}: storage {t.storage.key!r} is missing from the archive", path)
        start, length = m
        if t.storage.nbytes > length:
            raise FormatError(f"tensor {name!r}: storage {t.storage.key!r} holds {length} bytes, "
                              f"the pickle claims {t.storage.nbytes}", path)
        itemsize = DTYPES[t.dtype].itemsize
        begin = t.offset * itemsize
        end = begin + numel(t.shape) * itemsize
        if end > length:
            raise FormatError(f"tensor {name!r}: needs bytes {begin}..{end} of storage {t.storage.key!r}, "
                              f"which holds {length}", path)
        lo, hi = start + begin, start + end
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

__all__ = ["SHIM", "Unsupported", "PtTensor", "load", "open_torch_zip"]
