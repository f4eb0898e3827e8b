"""HDF5 files (.h5/.hdf5, Keras weight files included), read lazily with h5py.

Every dataset becomes a tensor named by its path with ``/`` turned into
``.`` (``model_weights/dense/dense/kernel:0`` -> ``model_weights.dense.dense.kernel:0``).
Bytes are read in bounded slabs along the leading axes and converted to
little-endian C order, so a big-endian file hashes like any other.

bfloat16 and float8 have no native HDF5 type: we store them (and read them)
as same-width unsigned integers carrying an attribute ``dtype`` with the
canonical name (write it as a fixed-length ASCII string, ``np.bytes_(name)``;
variable-length strings are read too). Datasets of types the dtype table cannot hold (strings,
compound, complex) are skipped and listed in ``metadata["skipped"]``.

Security: external links, external raw storage and virtual datasets can make
a file read arbitrary other files on the machine; such files are refused.
Parsing itself is the HDF5 C library's: we read no variable-length data
except string attributes, because a corrupted global heap can make the
library spin forever (seen with HDF5 2.0.0 while fuzzing), which no Python
code can interrupt; under the CLI, opening and walking the metadata runs
under a C-level deadline (:mod:`ckptdiff.watchdog`) that ends such a run
with one line and exit code 2.

Reference: h5py over the HDF5 C library (what Keras and h5py users load).
Stricter: external links, external raw storage, virtual datasets and
user-defined links are refused; soft links are not followed; the group walk
is our own and linear in the number of links (h5py's ``visititems`` is
quadratic in the nesting depth).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from ..checkpoint import Checkpoint, SpanRef, TensorRef, check_shape
from ..dtypes import DTYPES, DType, from_numpy
from .. import watchdog
from ..errors import CkptError, FormatError
from ..textsafe import printable
from ._common import json_safe, le_bytes, map_file, numel, open_binary, slabs, with_path

FORMAT = "hdf5"
#: Attribute that names the real dtype of a dataset stored as raw unsigned ints.
DTYPE_ATTR = "dtype"
_REINTERPRETABLE = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
_T = TypeVar("_T")


def open_hdf5(path: str | os.PathLike[str]) -> Checkpoint:
    import h5py

    p = os.fspath(path)
    seconds = watchdog.hdf5_timeout()
    # Opening and walking the metadata is where a corrupted file can make the
    # HDF5 library loop forever; under the CLI that ends as one line, exit 2.
    with watchdog.deadline(seconds, f"{printable(p)}: the HDF5 library did not finish reading this file's "
                                    f"metadata in {seconds:g} s; the file is probably corrupt (a damaged file "
                                    f"can make HDF5 loop forever). Set {watchdog.HDF5_TIMEOUT_ENV}=SECONDS "
                                    "to wait longer"):
        try:
            f = h5py.File(p, "r")
        except FileNotFoundError:
            raise CkptError("no such file or directory", p) from None
        except (OSError, RuntimeError, ValueError) as e:
            raise FormatError(f"corrupt or unreadable HDF5 file ({_h5msg(e)})", p) from None
        raw = _RawFile(p)
        try:
            ckpt = _build(h5py, f, p, raw)
        except BaseException:
            raw.close()
            f.close()
            raise
    if all(isinstance(t, SpanRef) for t in ckpt.tensors.values()):
        # Every tensor is read from the file's own bytes: HDF5's per-file state
        # (metadata cache, open objects) is not needed for the diff, so it goes now.
        f.close()
        _trim_heap()
    else:
        ckpt.on_close(f.close)
    ckpt.on_close(raw.close)
    return ckpt


class _RawFile:
    """The file's own bytes, for datasets stored plainly (see _direct_ref): a descriptor and a map.

    Opened beside h5py's handle only when a dataset qualifies, and closed with the checkpoint.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.whole: memoryview | None = None
        self._mm: Any = None
        self.size = 0

    def open(self) -> bool:
        if self.fd is None:
            with open_binary(self.path) as f:
                mm = map_file(f, self.path)
                if mm is None:
                    return False
                self.fd = os.dup(f.fileno())
            self._mm, self.whole, self.size = mm, memoryview(mm), len(mm)
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.whole is not None:
            self.whole.release()
            self._mm.close()
            self.whole = self._mm = None


def _trim_heap() -> None:
    """Give the heap pages HDF5 has just freed back to the system (glibc's ``malloc_trim``).

    A closed file's state (its metadata cache alone is ~0.5 MB) goes back to
    malloc, which keeps it for reuse; nothing the diff does next reuses it (its
    buffers are maps of their own), so it would stay resident through the
    diff's peak. Elsewhere than glibc this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other libcs without it
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _h5msg(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:300]


def _build(h5py: Any, f: Any, p: str, raw: _RawFile) -> Checkpoint:
    def ref_of(hpath: str, ds: Any) -> tuple[str, str, tuple[TensorRef | None, str] | None, Exception | None]:
        # Each dataset becomes its ref as the walk meets it, so h5py's handle on it
        # (and HDF5's memory for it) goes at once unless the ref reads through h5py;
        # an error waits for the walk to finish, which may refuse the file first.
        name = hpath.lstrip("/").replace("/", ".")
        try:
            return hpath, name, _dataset_ref(h5py, ds, name, p, raw), None
        except Exception as e:  # raised below, in walk order, as if met there
            return hpath, name, None, e

    try:
        datasets = _datasets(h5py, f, p, ref_of)
    except CkptError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, SystemError) as e:
        raise FormatError(f"corrupt HDF5 structure ({_h5msg(e)})", p) from None

    tensors: dict[str, TensorRef] = {}
    skipped: list[str] = []
    for hpath, name, made, error in datasets:
        try:
            if error is not None:
                raise error
            assert made is not None
            ref, why = made
        except CkptError as e:
            raise with_path(e, p) from None
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise FormatError(f"dataset {hpath!r}: {_h5msg(e)}", p) from None
        if ref is None:
            skipped.append(f"{hpath} ({why})")
            continue
        if name in tensors:
            raise FormatError(f"two datasets map to the tensor name {name!r}", p)
        tensors[name] = ref

    metadata: dict[str, Any] = {}
    try:
        for k, v in f.attrs.items():
            metadata[str(k)] = json_safe(v)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        metadata["attrs_error"] = _h5msg(e)
    if skipped:
        metadata["skipped"] = skipped
    return Checkpoint(p, FORMAT, tensors, metadata)


def _datasets(h5py: Any, f: Any, p: str, visit: Callable[[str, Any], _T]) -> list[_T]:
    """``visit(path, dataset)`` for every dataset reachable by hard links, once, named by
    the first path found, in h5py's visit order; the list of what it returned.

    A walk of our own, group by group: h5py's ``visititems`` looks every
    object up again by its full path from the root, which is quadratic in the
    nesting depth (2,000 nested groups took minutes). Here each step opens a
    child relative to its parent, so the walk is linear in the number of
    links. Links are checked as they are met: an external or user-defined
    link is refused even if nothing under it is read; soft links are not
    followed (the object they name is reached by its hard link, if any).
    """
    out: list[_T] = []
    seen = {_identity(h5py, f)}
    stack: list[tuple[Any, str, Iterator[Any]]] = [(f, "", _names(f))]
    while stack:
        group, prefix, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        path = prefix + (name if isinstance(name, str) else name.decode("utf-8", "backslashreplace"))
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise FormatError(f"refused: {path!r} is an external link to {link.filename}:{link.path}; "
                              "ckptdiff does not follow links out of the file", p)
        if not isinstance(link, (h5py.HardLink, h5py.SoftLink)):
            raise FormatError(f"refused: {path!r} is a user-defined link", p)
        if isinstance(link, h5py.SoftLink):
            continue
        obj = group.get(name)
        if obj is None:
            continue
        key = _identity(h5py, obj)
        if key in seen:
            continue
        seen.add(key)
        if isinstance(obj, h5py.Group):
            stack.append((obj, path + "/", _names(obj)))
        elif isinstance(obj, h5py.Dataset):
            out.append(visit(path, obj))
    return out


def _identity(h5py: Any, obj: Any) -> tuple[Any, Any]:
    """What makes two handles the same HDF5 object: h5py's own test (file and object numbers),
    kept instead of the handle, which would keep every object open until the walk ends."""
    info = h5py.h5g.get_objinfo(obj.id, b".", 0)
    return info.fileno, info.objno


def _names(group: Any) -> Iterator[Any]:
    """Link names in HDF5's name order (bytes order; h5py gives undecodable names as bytes)."""
    return iter(sorted(group.keys(), key=lambda n: n.encode("utf-8", "surrogatepass") if isinstance(n, str) else n))


def _dataset_ref(h5py: Any, ds: Any, name: str, p: str, raw: _RawFile) -> tuple[TensorRef | None, str]:
    if ds.is_virtual:
        raise FormatError(f"refused: dataset {ds.name!r} is a virtual dataset (it reads other files)", p)
    if ds.external:
        files = ", ".join(str(e[0]) for e in ds.external)
        raise FormatError(f"refused: dataset {ds.name!r} keeps its data in external files ({files})", p)
    if ds.shape is None:
        return None, "empty dataspace"
    stored = ds.dtype
    if stored.kind not in "biuf" or stored.fields is not None or stored.subdtype is not None:
        return None, f"unsupported type {stored}"
    try:
        native = from_numpy(stored)
    except CkptError:
        return None, f"unsupported type {stored}"
    dt = _declared_dtype(ds, native, p)
    shape = check_shape(name, ds.shape)
    # The little-endian numpy type we read into: the stored type (not the
    # declared bf16/fp8, which h5py cannot convert to), in C order.
    read_as = native.np_dtype
    direct = _direct_ref(ds, name, dt, shape, read_as, raw)
    if direct is not None:
        return direct, ""
    return TensorRef(name, dt.name, shape, pieces=_pieces(ds, shape, read_as, p), source=ds.name), ""


def _direct_ref(ds: Any, name: str, dt: DType, shape: tuple[int, ...], read_as: np.dtype,
                raw: _RawFile) -> TensorRef | None:
    """A dataset whose file bytes already are the tensor's bytes, read like a safetensors tensor.

    Contiguous layout (no chunks, so no filters), allocated, stored in the
    little-endian type we would convert to, and lying inside the file: then
    the bytes at its offset are its elements in C order, exactly what
    ``ds[...]`` would return, and the engine can ``pread`` them into its own
    buffers (no h5py selection, numpy array or copy per slab) and batch
    neighbours into runs. Anything else goes through h5py.
    """
    nbytes = numel(shape) * dt.itemsize
    if ds.chunks is not None or ds.dtype != read_as or nbytes == 0:
        return None
    offset = ds.id.get_offset()
    if offset is None or ds.id.get_storage_size() != nbytes or not raw.open():
        return None
    if offset < 0 or offset + nbytes > raw.size:
        return None  # h5py will say what is wrong, if anything, when the bytes are read
    assert raw.fd is not None and raw.whole is not None
    return SpanRef.at(name, dt.name, shape, nbytes, whole=raw.whole, fd=raw.fd, offset=offset, source=ds.name)


def _declared_dtype(ds: Any, native: DType, p: str) -> DType:
    """Honour a ``dtype`` attribute naming the real type of raw unsigned-int storage."""
    if DTYPE_ATTR not in ds.attrs:
        return native
    raw = ds.attrs[DTYPE_ATTR]
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw.item()
    if isinstance(raw, (bytes, np.bytes_)):
        raw = bytes(raw).decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise FormatError(f"dataset {ds.name!r}: attribute 'dtype' is not a string: {raw!r}", p)
    if raw == native.name:
        return native
    declared = DTYPES.get(raw)
    if declared is None:
        raise FormatError(f"dataset {ds.name!r}: attribute dtype={raw!r} is not a known dtype", p)
    if raw not in _REINTERPRETABLE or native.kind != "uint" or native.itemsize != declared.itemsize:
        raise FormatError(
            f"dataset {ds.name!r}: attribute dtype={raw!r} does not fit the stored type {native.name} "
            f"(only bfloat16/float8 stored as same-width unsigned ints can be relabelled)", p)
    return declared


def _pieces(ds: Any, shape: tuple[int, ...], read_as: np.dtype, p: str) -> Callable[[], Iterator[memoryview]]:
    def pieces() -> Iterator[memoryview]:
        try:
            for sel in slabs(shape, read_as.itemsize):
                yield le_bytes(np.asarray(ds[sel] if sel else ds[()]), read_as)
        except CkptError:
            raise
        except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
            raise FormatError(f"cannot read dataset {ds.name!r} ({_h5msg(e)})", p) from None
    return pieces
