"""Checkpoint and TensorRef: the one shape every format opens as.

A :class:`Checkpoint` is a read-only mapping from tensor name to a lazy
:class:`TensorRef`. Nothing reads tensor bytes until asked, and then only in
chunks, so the diff engine and the store can stream checkpoints far larger
than memory. Readers (``ckptdiff.formats``) build these; the engine, the
store, the CLI and the TUI only ever see this module's types.

Byte contract: a TensorRef's bytes are the tensor's elements in C order,
little-endian, exactly ``numel * itemsize`` of them. Readers convert anything
else (big-endian HDF5, Fortran-ordered .npy) before handing bytes out, so the
same weights hash the same whatever file they came from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, ValuesView
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)

from . import dtypes
from .errors import CkptError, FormatError

if TYPE_CHECKING:
    from typing import Any
    import numpy as np

    from .manifest import Manifest

#: Default chunk size for streaming tensor bytes: big enough to amortise
#: per-call overhead, small enough that a worker's two chunks stay in cache
#: between the read, the memcmp and BLAKE3. Measured in-process on the 1 GB
#: benchmark pair (best of 8, two threads): 1 MiB 0.144 s, 2 MiB 0.144 s,
#: 4 MiB 0.154 s, 8 MiB 0.186 s; 1 MiB and 2 MiB also tie on the 2,000-tensor
#: pairs (runs of neighbours are capped at this size) and on HDF5, and 1 MiB
#: holds 4 MiB less for two workers' buffers.
DEFAULT_CHUNK_BYTES = 1 << 20

Buffer = bytes | bytearray | memoryview


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


class TensorRef:
    """A tensor inside a checkpoint, not yet read.

    Exactly one of ``view`` and ``pieces`` is given by the reader:

    * ``view()`` returns a zero-copy memoryview of all the tensor's bytes
      (mmap-backed formats: safetensors, .npy, uncompressed .npz, .pt via
      torch's mmap). The engine slices it directly.
    * ``pieces()`` yields the bytes in pieces of any size (HDF5 slabs,
      compressed .npz members, store blobs); :meth:`chunks` re-cuts them.

    A reader may add ``read_into`` beside either: a positional read
    (``pread``) into a caller's buffer. Streaming a big file through two
    small reused buffers is cheaper than faulting in, and later unmapping,
    every page of an mmap, and the resident set stays flat; the engine uses
    it through ``chunks(into=...)``.
    """

    #: BLAKE3 hex digest of the bytes when the source already knows it (the store): ``hash``.
    #: Where the bytes live, for messages only (e.g. a shard's file name): ``source``.
    #: Optional ``read_into(offset, buf)``: copies bytes from ``offset`` of the tensor into ``buf``
    #: and returns how many (fewer only at the end of the data; 0 means the source ended).
    #: Optional ``file_span``: ``(fd, offset)`` when the bytes lie contiguously at ``offset`` of an
    #: open file descriptor (valid while the checkpoint is open); lets the engine read a run of
    #: neighbouring small tensors with one ``pread`` instead of one per tensor. Set with ``read_into``.

    #: ``numel * itemsize``, fixed at construction: the engine asks for it
    #: several times per tensor, and a 2,000-tensor model makes that add up.
    _nbytes = 0

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...],
                 view: Callable[[], memoryview] | None = None,
                 pieces: Callable[[], Iterable[Buffer]] | None = None, hash: str | None = None,  # noqa: A002
                 source: str | None = None, read_into: Callable[[int, memoryview], int] | None = None,
                 file_span: tuple[int, int] | None = None) -> None:
        self.name, self.dtype, self.view, self.pieces, self.hash = name, dtype, view, pieces, hash
        self.source, self.read_into, self.file_span = source, read_into, file_span
        self.shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in self.shape):
            raise FormatError(f"tensor {self.name!r} has a negative dimension {self.shape}")
        self._nbytes = _numel(self.shape) * dtypes.get(self.dtype).itemsize  # also validates the name
        if (self.view is None) == (self.pieces is None):
            raise ValueError("TensorRef needs exactly one of view= or pieces=")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype!r}, shape={self.shape!r}, "
                f"hash={self.hash!r}, source={self.source!r})")

    @classmethod
    def checked(cls, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, *,
                view: Callable[[], memoryview], source: str | None,
                read_into: Callable[[int, memoryview], int] | None, file_span: tuple[int, int] | None) -> TensorRef:
        """Build a ref whose fields the reader has already validated (a tuple of
        non-negative ints, a dtype from the table, ``nbytes`` computed from
        them): skips the checks of ``__init__``, which are a third of opening a
        2,000-tensor safetensors file."""
        ref = cls.__new__(cls)
        ref.name, ref.dtype, ref.shape, ref.view, ref.pieces, ref.hash = name, dtype, shape, view, None, None
        ref.source, ref.read_into, ref.file_span, ref._nbytes = source, read_into, file_span, nbytes
        return ref

    @property
    def dtype_info(self) -> dtypes.DType:
        return dtypes.DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.dtype_info.itemsize

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def buffer(self) -> memoryview | None:
        """All bytes as one zero-copy view, or None if the source cannot give one."""
        if self.view is None:
            return None
        mv = self.view()
        mv = mv if isinstance(mv, memoryview) else memoryview(mv)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if mv.nbytes != self.nbytes:
            raise FormatError(f"tensor {self.name!r}: expected {self.nbytes} bytes, source holds {mv.nbytes}")
        return mv

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, into: Buffer | None = None) -> Iterator[memoryview]:
        """Yield the bytes in chunks of exactly ``chunk_bytes`` (the last may be shorter).

        ``chunk_bytes`` is rounded down to a multiple of the item size, so a
        chunk never splits an element and two tensors of one dtype chunked with
        the same size line up element for element.

        ``into``: a writable buffer of at least ``chunk_bytes`` to reuse. When
        the source has ``read_into`` the chunks are read into it, and each
        yielded chunk is then valid only until the next one is asked for.
        Otherwise ``into`` is ignored.
        """
        step = max(self.itemsize, chunk_bytes - chunk_bytes % self.itemsize)
        if into is not None and self.read_into is not None:
            buf = into if isinstance(into, memoryview) and into.format == "B" else memoryview(into).cast("B")
            if buf.nbytes >= step and not buf.readonly:
                yield from self._read_chunks(buf, step)
                return
        whole = self.buffer()
        if whole is not None:
            for start in range(0, whole.nbytes, step):
                yield whole[start:start + step]
            return
        assert self.pieces is not None
        yield from _rechunk(self.pieces(), step, self.nbytes, self.name)

    def _read_chunks(self, buf: memoryview, step: int) -> Iterator[memoryview]:
        assert self.read_into is not None
        total = self.nbytes
        for start in range(0, total, step):
            mv = buf[:min(step, total - start)]
            fill_exact(self.read_into, mv, start, total, f"tensor {self.name!r}")
            yield mv

    def read(self) -> bytes:
        """All bytes, copied. For small tensors and tests; the engine streams instead."""
        whole = self.buffer()
        if whole is not None:
            return whole.tobytes()
        return b"".join(bytes(c) for c in self.chunks())

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array (bf16/fp8 through ml_dtypes). Reads it whole."""
        import numpy as np

        whole = self.buffer()
        data: Buffer = whole if whole is not None else self.read()
        return np.frombuffer(data, dtype=self.dtype_info.np_dtype).reshape(self.shape)


class SpanRef(TensorRef):
    """A tensor whose bytes lie contiguously in a file that is open and mapped (safetensors, plain HDF5).

    Its ``view`` and ``read_into`` are made when asked for, from the map, the
    descriptor and the offset, rather than held as two closures per tensor:
    a 200,000-tensor file would otherwise hold 400,000 of them, most never
    called (runs of neighbours are read through ``file_span`` directly).
    """

    @classmethod
    def at(cls, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, *, whole: memoryview, fd: int,
           offset: int, source: str | None) -> SpanRef:
        """A ref for bytes ``offset .. offset + nbytes`` of ``whole`` (the map of ``fd``), fields already validated."""
        ref = cls.__new__(cls)
        ref.name, ref.dtype, ref.shape, ref.pieces, ref.hash, ref.source = name, dtype, shape, None, None, source
        ref.file_span, ref._nbytes, ref._whole = (fd, offset), nbytes, whole
        return ref

    @property  # type: ignore[override]  # a field of the base class, derived here
    def view(self) -> Callable[[], memoryview]:
        whole, lo, hi = self._whole, self.file_span[1], self.file_span[1] + self._nbytes  # type: ignore[index]

        def view() -> memoryview:
            return whole[lo:hi]
        return view

    @property  # type: ignore[override]
    def read_into(self) -> Callable[[int, memoryview], int]:
        fd, lo = self.file_span  # type: ignore[misc]
        size = self._nbytes

        def read_into(offset: int, buf: memoryview) -> int:
            n = min(buf.nbytes, size - offset)
            if n <= 0:
                return 0
            return os.preadv(fd, [buf[:n] if n < buf.nbytes else buf], lo + offset)
        return read_into


class SpanTable(Mapping[str, TensorRef]):
    """The tensors of one open, mapped file, held as columns; a :class:`SpanRef` is made only when asked for.

    Readers of files whose tensors each lie contiguously (safetensors) hand
    the checkpoint this instead of a dict of refs: a 200,000-tensor file
    would otherwise hold 200,000 ref objects that a diff never touches
    (the engine compares such tables column by column, see
    ``engine._diff_tables``). Columns, one entry per tensor in file order:
    ``names``, ``dtypes`` (canonical names), ``shapes`` (tuples; equal
    shapes may share one object), ``offsets`` (file offsets less ``base``)
    and ``nbytes``; the last two are any int sequences (lists, or int64
    memoryviews). Fields are trusted: the reader validated them.
    """

    __slots__ = ("names", "dtypes", "shapes", "offsets", "nbytes", "base", "whole", "fd", "source", "_index",
                 "__weakref__")

    def __init__(self, names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]], offsets: Any,
                 nbytes: Any, *, base: int, whole: memoryview, fd: int, source: str | None) -> None:
        self.names, self.dtypes, self.shapes, self.offsets, self.nbytes = names, dtypes, shapes, offsets, nbytes
        self.base, self.whole, self.fd, self.source = base, whole, fd, source
        self._index: dict[str, int] | None = None

    @property
    def index(self) -> dict[str, int]:
        """Name -> row, built on first use (a diff of two files with the same names never needs it)."""
        if self._index is None:
            self._index = dict(zip(self.names, range(len(self.names))))
        return self._index

    def ref(self, i: int) -> SpanRef:
        return SpanRef.at(self.names[i], self.dtypes[i], self.shapes[i], self.nbytes[i], whole=self.whole,
                          fd=self.fd, offset=self.base + self.offsets[i], source=self.source)

    def __getitem__(self, name: str) -> TensorRef:
        return self.ref(self.index[name])

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def values(self) -> ValuesView[TensorRef]:
        return _TableValues(self)

    def items(self) -> ItemsView[str, TensorRef]:
        return _TableItems(self)

    def total_bytes(self) -> int:
        return sum(self.nbytes)


class _TableValues(ValuesView[TensorRef]):
    _mapping: SpanTable

    def __iter__(self) -> Iterator[TensorRef]:
        table = self._mapping
        return map(table.ref, range(len(table)))


class _TableItems(ItemsView[str, TensorRef]):
    _mapping: SpanTable

    def __iter__(self) -> Iterator[tuple[str, TensorRef]]:
        table = self._mapping
        return zip(table.names, map(table.ref, range(len(table))))


def fill_exact(read_into: Callable[[int, memoryview], int], buf: memoryview, offset: int, total: int,
               what: str) -> None:
    """Fill all of ``buf`` with bytes ``offset..`` through a ``read_into``-style reader
    (which may return fewer bytes than asked); FormatError if the source ends first.
    ``total`` is the source's expected size, for the message."""
    got = 0
    while got < buf.nbytes:
        n = read_into(offset + got, buf[got:])
        if n <= 0:
            raise FormatError(f"{what}: source ended after {offset + got} of {total} bytes")
        got += n


def _rechunk(pieces: Iterable[Buffer], step: int, expected: int, name: str) -> Iterator[memoryview]:
    """Re-cut arbitrary pieces into exact ``step``-sized chunks, checking the total."""
    pending = bytearray()
    total = 0
    for piece in pieces:
        mv = memoryview(piece).cast("B") if not isinstance(piece, memoryview) or piece.format != "B" else piece
        total += mv.nbytes
        if total > expected:
            raise FormatError(f"tensor {name!r}: source holds more than the expected {expected} bytes")
        if not pending and mv.nbytes == step:
            yield mv
            continue
        pending += mv
        while len(pending) >= step:
            yield memoryview(bytes(pending[:step]))
            del pending[:step]
    if total != expected:
        raise FormatError(f"tensor {name!r}: expected {expected} bytes, source holds {total}")
    if pending:
        yield memoryview(bytes(pending))


class Checkpoint(Mapping[str, TensorRef]):
    """A read-only mapping of tensor name -> TensorRef, plus what the file says about itself.

    ``metadata`` holds non-tensor values (safetensors ``__metadata__``,
    scalars of a nested training checkpoint such as ``epoch``); ``manifest`` is
    a trainable-key manifest embedded in the checkpoint, if any.
    Close it (or use ``with``) to release mmaps and file handles.
    """

    def __init__(self, path: str, format: str, tensors: Mapping[str, TensorRef],  # noqa: A002
                 metadata: dict[str, Any] | None = None, manifest: Manifest | None = None,
                 auxiliary: tuple[str, ...] = ()) -> None:
        self.path, self.format = path, format
        #: name -> ref: a dict, or a :class:`SpanTable` (columns, refs made on demand).
        self.tensors = tensors
        self.metadata: dict[str, Any] = {} if metadata is None else metadata
        self.manifest = manifest
        #: Top-level names of training state that is not model weights (a .pt
        #: checkpoint's ``optimizer``, ``scheduler``, ``ema``...): tensors under
        #: them are expected to change, so the engine treats them as buffers
        #: unless the manifest itself names them.
        self.auxiliary = auxiliary
        self._closers: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"Checkpoint(path={self.path!r}, format={self.format!r}, tensors={len(self.tensors)})"

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        if isinstance(self.tensors, SpanTable):
            return self.tensors.total_bytes()
        return sum(t.nbytes for t in self.tensors.values())

    def subset(self, names: Iterable[str]) -> Checkpoint:
        """A view of some of these tensors (names absent here are skipped); closing it leaves this one open.

        It keeps the training-state names (``auxiliary``): the policy makes
        them buffers, and a view without them would call optimizer state frozen.
        """
        return Checkpoint(self.path, self.format, {n: self.tensors[n] for n in names if n in self.tensors},
                          dict(self.metadata), self.manifest, auxiliary=self.auxiliary)

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except (BufferError, OSError, ValueError):
                # An mmap still exported by a live memoryview cannot close
                # yet; the GC releases it with the last view.
                pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        *,
        path: str = "<memory>",
        format: str = "memory",
        metadata: dict[str, Any] | None = None,
        manifest: Manifest | None = None,
    ) -> Checkpoint:
        """Wrap in-memory numpy arrays (any dtype in the table) as a Checkpoint."""
        import numpy as np

        tensors: dict[str, TensorRef] = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            dt = dtypes.from_numpy(arr.dtype)
            # ascontiguousarray turns a 0-d array into shape (1,): keep the shape.
            arr = np.ascontiguousarray(arr, dtype=dt.np_dtype).reshape(arr.shape)
            tensors[name] = TensorRef(name, dt.name, arr.shape, view=_array_view(arr))
        return cls(path, format, tensors, dict(metadata or {}), manifest)


def _array_view(arr: np.ndarray) -> Callable[[], memoryview]:
    import numpy as np

    def view() -> memoryview:
        return memoryview(arr.reshape(-1).view(np.uint8))
    return view


def check_shape(name: str, shape: Iterable[Any], *, max_elements: int = 1 << 48) -> tuple[int, ...]:
    """Validate an untrusted shape: non-negative ints whose product cannot overflow."""
    out: list[int] = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise FormatError(f"tensor {name!r}: invalid dimension {s!r}")
        out.append(s)
    n = 1
    for s in out:
        n *= s
        if n > max_elements:
            raise FormatError(f"tensor {name!r}: shape {tuple(out)} is absurdly large")
    return tuple(out)


__all__ = ["Checkpoint", "TensorRef", "SpanRef", "SpanTable", "DEFAULT_CHUNK_BYTES", "check_shape", "CkptError"]
