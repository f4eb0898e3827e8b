"""Format readers and the one entry point that picks between them.

The format is chosen by content (magic bytes), never by extension: a
``model.bin`` may be a torch zip, a legacy pickle or a safetensors file.
Each reader is a module with ``open_<format>(path) -> Checkpoint``; adding a
format is one module plus one line in :func:`sniff` and :func:`open_checkpoint`.

Readers know files only. Store references (``DIR@REF``) and store
directories are :mod:`ckptdiff.resolve`'s business, which is where what the
user typed becomes a Checkpoint.
"""

from __future__ import annotations

import os
import stat

from ..checkpoint import Checkpoint
from ..errors import CkptError, UnsupportedFormatError

SAFETENSORS = "safetensors"
SHARDED = "safetensors-sharded"
TORCH = "torch"
TORCH_LEGACY = "torch-legacy"
HDF5 = "hdf5"
NPY = "npy"
NPZ = "npz"
DCP = "dcp"
DCP_PART = "dcp-part"
PEFT_ADAPTER = "peft-adapter"

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
        from .sharded import find_index
        if find_index(path) is not None:
            return SHARDED
        if os.path.isfile(os.path.join(path, ".metadata")):
            return DCP
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            return SAFETENSORS
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return PEFT_ADAPTER
        raise UnsupportedFormatError(
            "is a directory without model.safetensors.index.json, pytorch_model.bin.index.json, model.safetensors, "
            "adapter_config.json, a torch.distributed.checkpoint .metadata or a ckptdiff store", path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFormatError("not a regular file", path)
    if st.st_size == 0:
        raise UnsupportedFormatError("file is empty (0 bytes)", path)
    if path.endswith((".safetensors.index.json", ".bin.index.json")):
        return SHARDED
    if path.endswith(".distcp") or os.path.basename(path) == ".metadata":
        return DCP_PART
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
    import zipfile  # only here: with shutil, bz2 and lzma it is ~3 ms of every other diff's start-up

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


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open any supported checkpoint file or sharded directory (store refs: :func:`ckptdiff.resolve.open_checkpoint`)."""
    spec = os.fspath(path)
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
    if fmt == DCP:
        from .dcp import open_dcp
        return open_dcp(spec)
    if fmt == DCP_PART:
        raise CkptError("is one file of a torch.distributed.checkpoint; pass its directory instead: "
                        f"{os.path.dirname(os.path.abspath(spec))}", spec)
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
    if fmt == PEFT_ADAPTER:
        from .peft_adapter import open_peft_adapter
        return open_peft_adapter(spec)
    raise UnsupportedFormatError(f"no reader for format {fmt}", spec)


__all__ = ["open_checkpoint", "sniff"]
