"""A torch.distributed.checkpoint (DCP) directory, opened as one checkpoint, without torch.

What DCP writes (``dcp.save``, any number of ranks)::

    DIR/.metadata        a pickle of torch.distributed.checkpoint.metadata.Metadata
    DIR/__<rank>_<n>.distcp   each rank's data: one ``torch.save`` zip per stored item,
                          one after another (or, with the safetensors layout, one
                          safetensors file per rank)

``Metadata.state_dict_metadata`` gives each flattened name (``model.0.weight``,
``optim.state.0.weight.exp_avg``) with its dtype, global size and chunks
(offset and size of each stored sub-block); ``storage_data`` says where each
chunk, and each non-tensor ("bytes") item, lies: a file, an offset and a length.
A tensor here is the assembly of its chunks, streamed chunk by chunk
(:mod:`.chunked`); a tensor stored whole (one rank, or DDP's deduplicated
save) is a zero-copy slice of the file, like a safetensors tensor.

Trust: ``.metadata`` is read with the ``.pt`` reader's unpickler machinery
and an allow-list of exactly the classes DCP pickles, each mapped to an inert
stand-in defined here; every chunk is read through the same allow-listed
reader of ``torch.save`` zips. Before any tensor byte is read: chunks must tile each
tensor exactly, files must lie inside the directory, byte ranges inside
their file, and no item may need a transform (DCP's compression extensions),
which is refused rather than misread.

Naming and training state follow the ``.pt`` reader exactly (the tree is
rebuilt and walked by :mod:`.torch_format`): the ``model`` wrapper is peeled,
so ``model.0.weight`` diffs against ``0.weight`` in a safetensors file, and
optimizer state beside it (``optim.*``) is training state (buffers).
"""

from __future__ import annotations

import io
import mmap
import os
import posixpath
from collections.abc import Callable
from typing import Any

from ..checkpoint import Checkpoint, TensorRef, check_shape
from ..dtypes import DTYPES, TORCH_NAMES
from ..errors import CkptError, FormatError
from . import torch_zip
from ._common import json_safe, map_file, numel, open_binary, pread_into, with_path
from .safe_pickle import Opaque, safe_unpickle
from .chunked import Chunk, assembled_pieces, check_tiling
from .sharded import member_path
from .torch_format import WRAPPER_KEYS, _finish, _flatten_checkpoint

FORMAT = "dcp"
METADATA_NAME = ".metadata"
#: A .metadata larger than this describes no checkpoint one machine could diff.
MAX_METADATA_BYTES = 256 << 20
#: Non-tensor items larger than this are summarised, not unpickled into metadata.
MAX_BYTES_ITEM = 1 << 20
_SAFETENSORS_DCP_KEY = "DCP_SHARDING_INFO"


# -- stand-ins for the classes DCP pickles ----------------------------------------------------

class _Record:
    """An inert object that accepts only a dict of fields (pickle BUILD) and nothing else."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict, slots) as protocol 2+ may write it
        if not isinstance(state, dict):
            raise FormatError(f"{type(self).__name__[1:]} state is not a dict of fields")
        self.fields = {k: v for k, v in state.items() if isinstance(k, str)}

    def get(self, key: str) -> Any:
        fields = getattr(self, "fields", None)  # unset when the pickle never BUILDs the object
        return fields.get(key) if fields is not None else None


class _Metadata(_Record):
    pass


class _MetadataIndex(_Record):
    pass


class _TensorStorageMetadata(_Record):
    pass


class _BytesStorageMetadata(_Record):
    pass


class _ChunkStorageMetadata(_Record):
    pass


class _StorageMeta(_Record):
    pass


class _StorageInfo(_Record):
    pass


class _TensorProperties(_Record):
    """Pickled by its own ``__getstate__`` as (dtype, layout, requires_grad, memory format, pin_memory)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            self.fields = {"dtype": state[0], "layout": state[1], "memory_format": state[3]}
        else:
            super().__setstate__(state)


def _layout(name: Any) -> str:
    if not isinstance(name, str):
        raise FormatError("tensor layout is not a name")
    return name


def _memory_format(code: Any) -> int:
    if isinstance(code, bool) or not isinstance(code, int):
        raise FormatError("memory format code is not an int")
    return code


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise FormatError("path parts are not strings")
    return posixpath.join(*parts) if parts else ""


#: torch dtypes outside ckptdiff's table: such tensors are listed under ``skipped``, not read.
_OTHER_TORCH_DTYPES = frozenset(
    "complex32 complex64 complex128 cfloat cdouble chalf qint8 quint8 qint32 quint4x2 quint2x4 "
    "float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 bits8 bits16 bits1x8 bits2x4 bits4x2 "
    "int1 int2 int3 int4 int5 int6 int7 uint1 uint2 uint3 uint4 uint5 uint6 uint7".split())
_MD = "torch.distributed.checkpoint.metadata"
_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")
_GLOBALS: dict[tuple[str, str], Any] = {
    (_MD, "Metadata"): _Metadata,
    (_MD, "MetadataIndex"): _MetadataIndex,
    (_MD, "TensorStorageMetadata"): _TensorStorageMetadata,
    (_MD, "BytesStorageMetadata"): _BytesStorageMetadata,
    (_MD, "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (_MD, "TensorProperties"): _TensorProperties,
    (_MD, "StorageMeta"): _StorageMeta,
    (_MD, "_MEM_FORMAT_ENCODING"): _memory_format,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch.serialization", "_get_layout"): _layout,
    ("torch", "Size"): torch_zip._size,
    **{(mod, cls): _path for mod in ("pathlib", "pathlib._local") for cls in _PATH_CLASSES},
}


def _metadata_global(module: str, name: str) -> Any:
    """DCP's allow-list for ``.metadata``; anything else is a placeholder, and the file is refused."""
    hit = _GLOBALS.get((module, name))
    if hit is not None:
        return hit
    if module == "torch" and name in TORCH_NAMES:
        return torch_zip._DType(TORCH_NAMES[name])
    if module == "torch" and name in _OTHER_TORCH_DTYPES:
        return torch_zip._DType(name)
    return Opaque(f"pickle global {module}.{name}")


def _no_persistent_ids(pid: Any) -> Any:
    raise torch_zip.Unsupported("a persistent id")


def _unpickle_metadata(raw: bytes) -> Any:
    """The one place this module unpickles ``.metadata``: safe_pickle's interpreter (the ``.pt``
    reader's bounds on memo, depth and integers) with DCP's allow-list, for the protocol
    ``pickle.dumps`` writes. Raises torch_zip.Unsupported for anything outside the allow-list,
    PickleRefused for a malformed or unbounded stream; callers turn both into one line."""
    obj, opaque, _end = safe_unpickle(raw, _metadata_global, _no_persistent_ids, protocol4=True)
    if opaque:
        raise torch_zip.Unsupported(opaque[0])
    return obj


def _read_torch_save(window: _Window) -> tuple[Any, dict[str, tuple[int, int]]]:
    """A ``torch.save`` zip inside a .distcp range, read with the ``.pt`` reader's zip
    member table (which checks the members) and unpickler. Returns the unpickled object
    and member -> (offset in the window, length)."""
    _prefix, members = torch_zip._member_offsets(window, window.length, None)  # type: ignore[arg-type]
    start, length = members["data.pkl"]
    if length > MAX_BYTES_ITEM:  # one tensor's or one value's pickle is a few hundred bytes
        raise torch_zip.Unsupported("data.pkl too large")
    return torch_zip.unpickle_data_pkl(window.pread(start, length), members), members


class _Window(io.RawIOBase):
    """A read-only, seekable file object over one item's bytes (a slice of the mapped file):
    zipfile finds a zip's directory from its end, so it must see only that item. Reads copy
    only what zipfile asks for (headers, the pickle), never the tensor data."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view, self.length, self.pos = view, view.nbytes, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.length)[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = self.view[self.pos:end].tobytes() if end > self.pos else b""
        self.pos = max(self.pos, end)
        return out

    def readinto(self, buf: Any) -> int:
        data = self.read(memoryview(buf).nbytes)
        memoryview(buf).cast("B")[:len(data)] = data
        return len(data)

    def pread(self, offset: int, n: int) -> bytes:
        return self.view[offset:offset + n].tobytes()


# -- opening ----------------------------------------------------------------------------------

class _Files:
    """The .distcp files of one checkpoint, each opened and mapped once, closed together."""

    def __init__(self, directory: str) -> None:
        self.d = directory
        self.root = os.path.realpath(directory)
        self.open: dict[str, tuple[int, int, memoryview | None]] = {}
        self.safetensors: dict[str, Checkpoint] = {}
        self._maps: list[mmap.mmap] = []

    def get(self, rel: str, where: str) -> tuple[int, int, memoryview | None]:
        """(descriptor, size, whole-file view) of a file named by the metadata."""
        hit = self.open.get(rel)
        if hit is None:
            full = member_path(self.d, self.root, rel, where, what="data file")
            with open_binary(full) as f:
                mm = map_file(f, full)
                fd = os.dup(f.fileno())
            if mm is not None:
                self._maps.append(mm)
            hit = self.open[rel] = (fd, mm.size() if mm is not None else 0, memoryview(mm) if mm else None)
        return hit

    def close(self) -> None:
        """Close every descriptor; an mmap still viewed by a caller is left to the GC."""
        for ck in self.safetensors.values():
            ck.close()
        for fd, _size, _mv in self.open.values():
            os.close(fd)
        for closer in [mv.release for _fd, _size, mv in self.open.values() if mv is not None] + \
                [mm.close for mm in self._maps]:
            try:
                closer()
            except BufferError:  # a caller still holds a view: the GC unmaps it with the last one
                pass
        self.open.clear()
        self._maps.clear()
        self.safetensors.clear()


class _DcpTensor:
    """A tensor leaf of the rebuilt state-dict tree (what torch_format's walk names)."""

    __slots__ = ("dtype", "shape", "chunks")

    def __init__(self, dtype: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
        self.dtype, self.shape, self.chunks = dtype, shape, chunks


class _Shim:
    """Stands in for the ``torch`` module in torch_format's tree walk: only ``Tensor`` is used."""

    Tensor = _DcpTensor


def open_dcp(directory: str | os.PathLike[str]) -> Checkpoint:
    """Open a DCP directory: every tensor assembled from its chunks, byte items as metadata."""
    d = os.fspath(directory)
    meta_path = os.path.join(d, METADATA_NAME)
    md = _load_metadata(meta_path)
    sd_meta, storage = _tables(md, meta_path)
    files = _Files(d)
    try:
        tree: dict[str, Any] = {}
        paths = _paths(list(sd_meta), md.get("planner_data"))
        skipped: list[str] = []
        for fqn, item in sd_meta.items():
            if isinstance(item, _BytesStorageMetadata):
                value: Any = _bytes_item(files, storage, fqn, meta_path)
            else:
                value = _tensor_item(files, storage, fqn, item, meta_path)
                if value is None:
                    skipped.append(fqn)
                    continue
            _place(tree, paths[fqn], value, fqn, meta_path)
        tensors, metadata, trainable, extras = _flatten_checkpoint(_Shim, tree, d)
        if skipped:
            metadata["skipped"] = skipped
        refs = {name: _ref(name, t) for name, t in tensors.items()}
        ckpt = _finish(d, refs, metadata, trainable, extras, fmt=FORMAT)
    except (TypeError, AttributeError, KeyError) as e:  # a crafted structure that no check above foresaw
        files.close()
        raise FormatError(f"malformed DCP metadata ({type(e).__name__}: {str(e)[:200]})", meta_path) from None
    except BaseException:
        files.close()
        raise
    ckpt.on_close(files.close)
    return ckpt


def _load_metadata(meta_path: str) -> _Record:
    with open_binary(meta_path) as f:
        raw = f.read(MAX_METADATA_BYTES + 1)
    if len(raw) > MAX_METADATA_BYTES:
        raise FormatError(f"{METADATA_NAME} is larger than {MAX_METADATA_BYTES >> 20} MiB", meta_path)
    try:
        md = _unpickle_metadata(raw)
    except torch_zip.Unsupported as e:
        raise FormatError(f"refused: {METADATA_NAME} holds {e}, which a DCP checkpoint never pickles; "
                          "ckptdiff never runs code from a checkpoint", meta_path) from None
    except CkptError as e:
        raise with_path(e, meta_path) from None
    except RecursionError:
        raise FormatError(f"{METADATA_NAME} is nested too deeply", meta_path) from None
    except Exception as e:  # any malformed pickle
        raise FormatError(f"corrupt {METADATA_NAME} ({type(e).__name__}: {str(e)[:200]})", meta_path) from None
    if not isinstance(md, _Metadata):
        raise FormatError(f"{METADATA_NAME} does not hold DCP Metadata", meta_path)
    return md


def _tables(md: _Record, where: str) -> tuple[dict[str, Any], dict[tuple[str, Any], _Record]]:
    """``state_dict_metadata`` checked, and ``storage_data`` keyed by (name, chunk offsets or None)."""
    sd_meta = md.get("state_dict_metadata")
    storage = md.get("storage_data")
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise FormatError("DCP metadata lacks its state_dict_metadata or storage_data table "
                          "(written by a storage layer ckptdiff does not know)", where)
    for fqn, item in sd_meta.items():
        if not isinstance(fqn, str) or not isinstance(item, (_TensorStorageMetadata, _BytesStorageMetadata)):
            raise FormatError(f"DCP metadata entry {fqn!r} is neither a tensor nor a bytes item", where)
    keyed: dict[tuple[str, Any], _Record] = {}
    for index, info in storage.items():
        if not isinstance(index, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise FormatError("DCP storage_data maps something other than an index to a storage location", where)
        fqn, offset = index.get("fqn"), index.get("offset")
        if not isinstance(fqn, str) or not (offset is None or isinstance(offset, tuple)
                                            and all(_nonneg(v) for v in offset)):
            raise FormatError("DCP storage_data has a malformed index", where)
        keyed[(fqn, offset)] = info
    return sd_meta, keyed


def _location(storage: dict[tuple[str, Any], _Record], fqn: str, offset: Any,
              where: str) -> tuple[str, int, int]:
    info = storage.get((fqn, offset))
    if info is None:
        at = "" if offset is None else f" at {offset}"
        raise FormatError(f"item {fqn!r}{at} has no storage location in the metadata", where)
    rel, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
    if not isinstance(rel, str) or not rel or not _nonneg(start) or not _nonneg(length):
        raise FormatError(f"item {fqn!r} has a malformed storage location", where)
    transforms = info.get("transform_descriptors")
    if transforms:
        raise FormatError(f"item {fqn!r} is stored through transforms {transforms!r} "
                          "(compression or another extension) that ckptdiff does not implement", where)
    return rel, start, length


def _nonneg(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _range(files: _Files, rel: str, start: int, length: int, fqn: str, where: str) -> tuple[int, memoryview]:
    """(descriptor, view of the item's bytes) after checking the range lies inside its file."""
    fd, size, whole = files.get(rel, where)
    if start + length > size or whole is None:
        raise FormatError(f"item {fqn!r}: bytes {start}..{start + length} lie outside {rel} "
                          f"({size} bytes)", where)
    return fd, whole[start:start + length]


def _bytes_item(files: _Files, storage: dict[tuple[str, Any], _Record], fqn: str, where: str) -> Any:
    """A non-tensor item (a learning rate, a step count): its value when it is plain data."""
    rel, start, length = _location(storage, fqn, None, where)
    _fd, item = _range(files, rel, start, length, fqn, where)
    if length > MAX_BYTES_ITEM:
        return f"<{length} bytes>"
    try:
        obj, _members = _read_torch_save(_Window(item))
    except Exception:  # noqa: BLE001 - anything but plain data (or a mangled zip) is shown as its size
        return f"<{length} bytes>"
    return json_safe(obj) if not _holds_tensor(obj) else f"<{length} bytes>"


def _holds_tensor(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, torch_zip.PtTensor):
        return True
    if depth > 64:
        return True
    if isinstance(obj, dict):
        return any(_holds_tensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in obj)
    return False


def _tensor_item(files: _Files, storage: dict[tuple[str, Any], _Record], fqn: str, item: _Record,
                 where: str) -> _DcpTensor | None:
    """The tensor's dtype, global shape and validated chunks; None for a dtype ckptdiff cannot hold."""
    props, size, chunks = item.get("properties"), item.get("size"), item.get("chunks")
    dtype = props.get("dtype") if isinstance(props, _TensorProperties) else None
    if not isinstance(dtype, torch_zip._DType) or not isinstance(dtype.name, str) or \
            not isinstance(size, tuple) or not isinstance(chunks, list):
        raise FormatError(f"tensor {fqn!r} has malformed metadata", where)
    if dtype.name not in DTYPES:
        return None
    if props.get("layout") not in (None, "torch.strided"):
        raise FormatError(f"tensor {fqn!r} has layout {props.get('layout')}; only dense tensors are read", where)
    try:
        shape = check_shape(fqn, size)
    except CkptError as e:
        raise with_path(e, where) from None
    itemsize = DTYPES[dtype.name].itemsize
    out: list[Chunk] = []
    for c in chunks:
        offsets = c.get("offsets") if isinstance(c, _ChunkStorageMetadata) else None
        sizes = c.get("sizes") if isinstance(c, _ChunkStorageMetadata) else None
        if not isinstance(offsets, tuple) or not isinstance(sizes, tuple) or \
                not all(_nonneg(v) for v in (*offsets, *sizes)):
            raise FormatError(f"tensor {fqn!r} has a malformed chunk", where)
        out.append(Chunk(offsets, sizes, lambda: memoryview(b"")))
    kept = check_tiling(fqn, shape, out, where)
    located = [_locate_chunk(files, storage, fqn, dtype.name, itemsize, c, where) for c in kept]
    return _DcpTensor(dtype.name, shape, located)


def _locate_chunk(files: _Files, storage: dict[tuple[str, Any], _Record], fqn: str, dtype: str, itemsize: int,
                  c: Chunk, where: str) -> Chunk:
    """The chunk with a view of its stored bytes, after checking they are what the metadata says."""
    rel, start, length = _location(storage, fqn, c.offsets, where)
    fd, item = _range(files, rel, start, length, fqn, where)
    nbytes = c.numel * itemsize
    whole = files.get(rel, where)[2]
    assert whole is not None  # _range proved the file non-empty
    if whole[8:9] == b"{":  # DCP's safetensors layout: the whole file is one safetensors file
        return Chunk(c.offsets, c.sizes, _safetensors_chunk(files, rel, fqn, dtype, c, nbytes, where))
    try:
        obj, members = _read_torch_save(_Window(item))
    except torch_zip.Unsupported as e:
        raise FormatError(f"tensor {fqn!r}: chunk at {c.offsets} is not a plain torch.save tensor ({e})",
                          where) from None
    except CkptError as e:
        raise with_path(e, where) from None
    except Exception as e:  # a mangled zip: zipfile raises several kinds
        raise FormatError(f"tensor {fqn!r}: chunk at {c.offsets} in {rel} is corrupt "
                          f"({type(e).__name__}: {str(e)[:200]})", where) from None
    if not isinstance(obj, torch_zip.PtTensor) or obj.dtype != dtype or obj.shape != c.sizes or \
            not isinstance(obj.storage, torch_zip._Storage) or not _nonneg(obj.offset):
        got = f"{obj.dtype} {obj.shape}" if isinstance(obj, torch_zip.PtTensor) else type(obj).__name__
        raise FormatError(f"tensor {fqn!r}: chunk at {c.offsets} holds {got}, the metadata says "
                          f"{dtype} {c.sizes}", where)
    member = members.get(f"data/{obj.storage.key}")  # a key that is no str names no member
    begin = obj.offset * itemsize
    if member is None or begin + nbytes > member[1]:
        raise FormatError(f"tensor {fqn!r}: chunk at {c.offsets} points past its stored bytes", where)
    lo = member[0] + begin
    return Chunk(c.offsets, c.sizes, lambda: item[lo:lo + nbytes], span=(fd, start + lo))


def _safetensors_chunk(files: _Files, rel: str, fqn: str, dtype: str, c: Chunk, nbytes: int,
                       where: str) -> Callable[[], memoryview]:
    import json

    from .safetensors_format import open_safetensors

    ck = files.safetensors.get(rel)
    if ck is None:
        ck = files.safetensors[rel] = open_safetensors(member_path(files.d, files.root, rel, where,
                                                                   what="data file"))
    ref = ck.tensors.get(fqn)
    try:
        info = json.loads(ck.metadata.get(_SAFETENSORS_DCP_KEY, "{}"))
        saved = info.get(fqn, {}).get("saved_offsets")
    except (ValueError, AttributeError):
        saved = None
    if ref is None or ref.dtype != dtype or ref.shape != c.sizes or tuple(saved or ()) != c.offsets:
        raise FormatError(f"tensor {fqn!r}: {rel} does not hold its chunk at {c.offsets} "
                          f"(its {_SAFETENSORS_DCP_KEY} or shape disagrees with the metadata)", where)
    return lambda: ref.buffer() or memoryview(b"")


def _paths(names: list[str], planner: Any) -> dict[str, tuple[str, ...]]:
    """Each flattened name as the path of keys it had in the saved state dict.

    DCP's planner records the paths (``("model", "0.weight")``); without them
    every dot separates keys, which names the tensors the same. A single
    top-level container around a model wrapper (the DCP tutorial's
    ``{"app": AppState(model, optimizer)}``) is peeled, as the ``.pt``
    reader peels ``state_dict``, so the model and its optimizer state are
    told apart as they are for any other save.
    """
    paths: dict[str, tuple[str, ...]] = {}
    for fqn in names:
        path = planner.get(fqn) if isinstance(planner, dict) else None
        ok = isinstance(path, tuple) and path and ".".join(str(p) for p in path) == fqn
        paths[fqn] = tuple(str(p) for p in path) if ok else tuple(fqn.split("."))
    if len({p[0] for p in paths.values()}) == 1 and all(len(p) > 1 for p in paths.values()) \
            and {p[1] for p in paths.values()} & set(WRAPPER_KEYS):
        paths = {fqn: p[1:] for fqn, p in paths.items()}
    return paths


def _place(tree: dict[str, Any], path: tuple[str, ...], value: Any, fqn: str, where: str) -> None:
    """Put an item back in a two-level tree (top-level key, rest of the name), so torch_format's
    walk sees what a ``.pt`` of the same state dict holds: ``{"model": {...}, "optim": {...}}``."""
    top, rest = path[0], ".".join(path[1:])
    if not rest:
        if top in tree:
            raise FormatError(f"two items are named {fqn!r}", where)
        tree[top] = value
        return
    group = tree.setdefault(top, {})
    if not isinstance(group, dict) or rest in group:
        raise FormatError(f"item {fqn!r} collides with another item's name", where)
    group[rest] = value


def _ref(name: str, t: _DcpTensor) -> TensorRef:
    itemsize = DTYPES[t.dtype].itemsize
    source = f"{len(t.chunks)} chunks" if len(t.chunks) > 1 else None
    if not t.chunks:  # an empty tensor
        return TensorRef(name, t.dtype, t.shape, view=lambda: memoryview(b""))
    if len(t.chunks) == 1:  # stored whole: a slice of the file, read like a safetensors tensor
        only = t.chunks[0]
        span = only.span
        return TensorRef(name, t.dtype, t.shape, view=only.view, source=source, file_span=span,
                         read_into=pread_into(span[0], span[1], span[1] + numel(t.shape) * itemsize)
                         if span is not None else None)
    return TensorRef(name, t.dtype, t.shape, pieces=assembled_pieces(t.shape, itemsize, t.chunks), source=source)


__all__ = ["FORMAT", "METADATA_NAME", "open_dcp"]
