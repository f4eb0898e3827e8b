"""Small pieces every reader needs: opening/mapping files with clear errors,
cutting arrays into bounded slabs, and making metadata JSON-safe.

Kept private (``_common``) because these are reader plumbing, not API.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Callable, Iterator
import sys

from ..errors import CkptError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

    import numpy as np

#: Target size of one slab when a reader has to copy (HDF5, byte-swapped or
#: Fortran-ordered arrays, compressed .npz members): bounded memory per read.
SLAB_BYTES = 4 << 20
#: Longer lists in a checkpoint's non-tensor values are summarised, not copied into metadata.
MAX_METADATA_ITEMS = 4096


def open_binary(path: str):  # -> BinaryIO
    """``open(path, 'rb')`` with every OSError turned into a one-line CkptError."""
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller owns the handle
    except FileNotFoundError:
        if os.path.islink(path):
            raise CkptError("broken symbolic link", path) from None
        raise CkptError("no such file or directory", path) from None
    except IsADirectoryError:
        raise CkptError("is a directory, expected a file", path) from None
    except OSError as e:
        raise CkptError(f"cannot open: {e.strerror or e}", path) from None


def map_file(f: Any, path: str) -> mmap.mmap | None:
    """Map an open file read-only; None for an empty file (mmap refuses length 0)."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return None
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CkptError(f"cannot memory-map: {e}", path) from None


def with_path(err: CkptError, path: str) -> CkptError:
    """Attach ``path`` to an error raised below the reader (dtype table, check_shape)."""
    if err.path is None:
        return type(err)(err.message, path)
    return err


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def slabs(shape: tuple[int, ...], itemsize: int, target: int | None = None) -> Iterator[tuple[Any, ...]]:
    """Index tuples that select consecutive C-order runs of about ``target`` bytes.

    Slices along the first axis when a row is small enough, and recurses into
    a single row when one row alone is bigger than ``target`` (a (2, 10**9)
    array is read in pieces of the second axis, not as two 4 GB rows).
    Yields nothing for an empty array and one ``()`` for a 0-d one.
    ``target`` defaults to :data:`SLAB_BYTES`, looked up at call time.
    """
    if target is None:
        target = SLAB_BYTES
    if not shape:
        yield ()
        return
    if any(s == 0 for s in shape):
        return
    row = numel(shape[1:]) * itemsize
    if len(shape) == 1 or row <= target:
        step = max(1, target // max(row, 1))
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])),)
        return
    for i in range(shape[0]):
        for rest in slabs(shape[1:], itemsize, target):
            yield (i, *rest)


def le_bytes(arr: np.ndarray, target: np.dtype) -> memoryview:
    """``arr`` as C-ordered little-endian bytes of ``target`` (copies only when needed)."""
    import numpy as np

    out = np.ascontiguousarray(arr, dtype=target)
    return memoryview(out.reshape(-1).view(np.uint8))


def small_json(raw: bytes, limit: int, what: str, path: str) -> Any:
    """Parse a small JSON side file (a shard index, an adapter config) read as ``raw``.

    The caller reads at most ``limit + 1`` bytes, so a huge file is refused
    here without being read whole; a bad file is one ``FormatError`` naming
    ``what`` it was meant to be.
    """
    from ..errors import FormatError

    if len(raw) > limit:
        raise FormatError(f"{what} is larger than {limit >> 20} MiB", path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge int literals
        raise FormatError(f"{what} is not valid JSON ({str(e)[:200]})", path) from None


def json_safe(value: Any, depth: int = 0) -> Any:
    """Turn a metadata value into something ``json.dumps`` accepts and a human can read."""
    if depth > 32:
        return "<nested too deep>"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # np.float64 is a float subclass: return a plain float
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    np = sys.modules.get("numpy")  # no numpy loaded: no value can be a numpy object
    if np is not None and isinstance(value, np.generic):
        return json_safe(value.item(), depth + 1)
    if np is not None and isinstance(value, np.ndarray):
        if value.size > 1024:
            return f"<array {value.dtype} {tuple(value.shape)}>"
        return json_safe(value.tolist(), depth + 1)
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        if len(value) > MAX_METADATA_ITEMS:  # a dataset index saved in a checkpoint is not metadata
            return f"<{type(value).__name__} of {len(value)} items>"
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v, depth + 1) for v in items]
    return str(value)


def pread_into(fd: int, lo: int, hi: int) -> Callable[[int, memoryview], int]:
    """A ``TensorRef.read_into`` for bytes ``lo..hi`` of an open descriptor.

    ``os.preadv`` needs no shared file position, so one descriptor serves
    every tensor of a file, from any thread; it never reads past ``hi``.
    """
    def read_into(offset: int, buf: memoryview) -> int:
        n = min(buf.nbytes, hi - lo - offset)
        if n <= 0:
            return 0
        return os.preadv(fd, [buf[:n] if n < buf.nbytes else buf], lo + offset)
    return read_into
