"""Format readers and the one entry point that picks between them.

The format is chosen by content (magic bytes), never by extension: a
``model.bin`` may be a torch zip, a legacy pickle or a safetensors file.
Each reader is a module with ``open_<format>(path) -> Checkpoint``; adding a
format is one module plus one line in :func:`sniff`.

``open_checkpoint`` also accepts a store reference ``DIR@REF`` (see
``ckptdiff.store``), so everything that takes a checkpoint takes a snapshot.
"""

from __future__ import annotations

import os
import stat
import zipfile

from ..checkpoint import Checkpoint
from ..errors import CkptError, UnsupportedFormatError

SAFETENSORS = "safetensors"
SHARDED = "safetensors-sharded"
TORCH = "torch"
TORCH_LEGACY = "torch-legacy"
HDF5 = "hdf5"
NPY = "npy"
NPZ = "npz"
STORE = "store"

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
#: Enough of the head to see a safetensors header's ``{`` behind leading whitespace.
_HEAD_BYTES = 4096
_MAX_HEAD_BYTES = 1 << 20
_JSON_SPACE = b" \t\r\n"


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CkptError("broken symbolic link", path) from None
        raise CkptError("no such file or directory", path) from None
    except OSError as e:
        # ELOOP (symlink loop), ENAMETOOLONG, EACCES, ...
        raise CkptError(e.strerror or str(e), path) from None


def sniff(path: str) -> str:
    """Name the format of ``path`` from its content; CkptError if none matches."""
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
            return SHARDED
        from ..store import is_store  # local import: the store is optional for plain diffs
        if is_store(path):
            return STORE
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            return SAFETENSORS
        raise UnsupportedFormatError(
            "is a directory without model.safetensors.index.json, model.safetensors or a ckptdiff store", path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFormatError("not a regular file", path)
    if st.st_size == 0:
        raise UnsupportedFormatError("file is empty (0 bytes)", path)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            while len(head) < _MAX_HEAD_BYTES and len(head) > 8 and not head[8:].lstrip(_JSON_SPACE):
                more = f.read(len(head))  # a safetensors header padded with whitespace: look further for '{'
                if not more:
                    break
                head += more
    except OSError as e:
        raise CkptError(f"cannot read: {e.strerror}", path) from None
    if head.startswith(_HDF5_MAGIC):
        return HDF5
    if head.startswith(_NPY_MAGIC):
        return NPY
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if len(head) >= 9 and head[8:].lstrip(_JSON_SPACE)[:1] == b"{" and int.from_bytes(head[:8], "little") > 0:
        # A JSON header after an 8-byte length: safetensors, even when the
        # length is absurd or the file truncated (the reader says which).
        # JSON allows whitespace before the object, and so does the reference.
        # Checked before the pickle test: a 640-byte header's length starts with bytes 0x80 0x02.
        return SAFETENSORS
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return TORCH_LEGACY  # a pickle stream: torch's legacy (pre-1.6) serialization
    raise UnsupportedFormatError(
        "unknown format (expected safetensors, PyTorch .pt/.pth/.bin, HDF5, .npy or .npz)", path)


def _sniff_zip(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        # NotImplementedError: zipfile's "zip file version N" on a mangled central directory
        raise CkptError(f"corrupt zip archive ({e})", path) from None
    if any(n.endswith("data.pkl") for n in names):
        return TORCH
    if names and all(n.endswith(".npy") for n in names):
        return NPZ
    if not names:
        return NPZ  # np.savez() with no arrays
    raise UnsupportedFormatError("zip archive that is neither a PyTorch checkpoint nor an .npz", path)


def split_store_ref(spec: str) -> tuple[str, str] | None:
    """``DIR@REF`` -> (DIR, REF) when DIR is a ckptdiff store; otherwise None.

    A path that itself exists is a path, even if it contains ``@``.
    """
    if "@" not in spec or os.path.exists(spec):
        return None
    base, _, ref = spec.rpartition("@")
    if not base or not ref:
        return None
    from ..store import is_store
    if not is_store(base):
        return None
    return base, ref


def _check_not_a_bad_ref(spec: str) -> None:
    """Explain a ``DIR@REF`` that cannot name a snapshot, instead of "no such file".

    ``runs@latest`` where ``runs`` is a plain directory, or ``runs/store@``
    with nothing after the ``@``, are almost certainly meant as store refs.
    """
    if "@" not in spec or os.path.lexists(spec):
        return
    base, _, ref = spec.rpartition("@")
    if not base or not os.path.exists(base):
        return
    from ..store import is_store
    if not is_store(base):
        raise CkptError(f"is not a ckptdiff store, so {spec!r} names no snapshot "
                        "(DIR@REF needs a store directory made by 'ckptdiff init' or 'ckptdiff snapshot')", base)
    if not ref.strip():
        raise CkptError("nothing after '@': name a snapshot, e.g. DIR@latest, DIR@step:500 or DIR@<tag>", spec)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open any supported checkpoint, a sharded directory, or a store ``DIR@REF``."""
    spec = os.fspath(path)
    ref = split_store_ref(spec)
    if ref is not None:
        from ..store import open_snapshot
        return open_snapshot(*ref)
    _check_not_a_bad_ref(spec)
    fmt = sniff(spec)
    from .. import watchdog
    from ..textsafe import printable

    seconds = watchdog.open_timeout()
    with watchdog.deadline(seconds, f"{printable(spec)}: opening this {fmt} file (reading its header, pickle or "
                                    f"directory) took longer than {seconds:g} s. Set {watchdog.OPEN_TIMEOUT_ENV}="
                                    "SECONDS to wait longer"):
        return _open_as(fmt, spec)


def _open_as(fmt: str, spec: str) -> Checkpoint:
    if fmt == SAFETENSORS:
        from .safetensors_format import open_safetensors
        target = os.path.join(spec, "model.safetensors") if os.path.isdir(spec) else spec
        return open_safetensors(target)
    if fmt == SHARDED:
        from .sharded import open_sharded
        return open_sharded(spec)
    if fmt in (TORCH, TORCH_LEGACY):
        from .torch_format import open_torch
        return open_torch(spec, legacy=(fmt == TORCH_LEGACY))
    if fmt == HDF5:
        from .hdf5_format import open_hdf5
        return open_hdf5(spec)
    if fmt == NPY:
        from .numpy_format import open_npy
        return open_npy(spec)
    if fmt == NPZ:
        from .numpy_format import open_npz
        return open_npz(spec)
    if fmt == STORE:
        raise CkptError("is a ckptdiff store: name a snapshot as DIR@REF (e.g. DIR@latest)", spec)
    raise UnsupportedFormatError(f"no reader for format {fmt}", spec)


__all__ = ["open_checkpoint", "sniff", "split_store_ref"]
