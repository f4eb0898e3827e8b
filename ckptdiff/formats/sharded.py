"""A Hugging Face sharded directory (safetensors or ``.bin`` shards), opened as one checkpoint.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``, for
``.bin`` shards, which are torch zips) maps each tensor name to the shard
file that holds it. The directory or the index file itself may be given. The
index is untrusted input like any header: shard names must stay inside the
directory (no absolute paths, no ``..``, no symlink that resolves
elsewhere), and every tensor must be exactly where the index says, once.
"""

from __future__ import annotations

import os

from ..checkpoint import Checkpoint, TensorRef
from ..errors import CkptError, FormatError
from ._common import small_json

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

#: The index files Hugging Face writes, in the order ``from_pretrained`` prefers them.
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
INDEX_NAME = INDEX_NAMES[0]
MAX_INDEX_BYTES = 64 << 20
FORMAT = "safetensors-sharded"
TORCH_FORMAT = "torch-sharded"


def find_index(directory: str) -> str | None:
    """The index file of a sharded directory, or None when it has none."""
    for name in INDEX_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def open_sharded(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a sharded directory, or the shard index file given directly."""
    p = os.fspath(path)
    if os.path.isdir(p):
        d, index_path = p, find_index(p)
        if index_path is None:
            raise CkptError(f"directory has none of {', '.join(INDEX_NAMES)}", p)
    else:
        d, index_path = os.path.dirname(p) or ".", p
    weight_map, index_meta = _read_index(index_path)

    root = os.path.realpath(d)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)

    opened: list[Checkpoint] = []
    tensors: dict[str, TensorRef] = {}
    where: dict[str, str] = {}
    shard_meta: dict[str, str] = {}
    formats: set[str] = set()
    try:
        for shard in sorted(by_shard):
            ck = _open_shard(member_path(d, root, shard, index_path))
            opened.append(ck)
            formats.add(ck.format)
            listed = set(by_shard[shard])
            for name in listed:
                if name not in ck:
                    raise FormatError(f"index puts tensor {name!r} in {shard}, but that shard does not hold it",
                                      index_path)
            for name, ref in ck.items():
                if name in where:
                    raise FormatError(f"tensor {name!r} is in two shards: {where[name]} and {shard}", d)
                indexed = weight_map.get(name)
                if indexed is not None and indexed != shard:
                    raise FormatError(f"tensor {name!r} is in two shards: {indexed} (per the index) and {shard}",
                                      d)
                where[name] = shard
                tensors[name] = ref
            for k, v in ck.metadata.items():
                shard_meta.setdefault(k, v)
    except BaseException:
        for ck in opened:
            ck.close()
        raise

    metadata: dict[str, Any] = dict(shard_meta)
    metadata.update(index_meta)
    metadata["shards"] = sorted(by_shard)
    ordered = {name: tensors[name] for name in sorted(tensors)}
    ckpt = Checkpoint(d, FORMAT if formats <= {"safetensors"} else TORCH_FORMAT, ordered, metadata)
    for ck in opened:
        ckpt.on_close(ck.close)
    return ckpt


def _open_shard(shard_path: str) -> Checkpoint:
    """A shard is a safetensors file or a torch file (``.bin``), told apart by content."""
    from . import SAFETENSORS, TORCH, TORCH_LEGACY, sniff

    fmt = sniff(shard_path)
    if fmt == SAFETENSORS:
        from .safetensors_format import open_safetensors
        return open_safetensors(shard_path)
    if fmt in (TORCH, TORCH_LEGACY):
        from .torch_format import open_torch
        return open_torch(shard_path, legacy=(fmt == TORCH_LEGACY))
    raise FormatError(f"shard is a {fmt} file; shards must be safetensors or PyTorch files", shard_path)


def _read_index(index_path: str) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise CkptError(f"cannot read the shard index: {e.strerror or e}", index_path) from None
    index = small_json(raw, MAX_INDEX_BYTES, "shard index", index_path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise FormatError("shard index has no 'weight_map' object", index_path)
    weight_map = index["weight_map"]
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise FormatError(f"weight_map entry for {name!r} is not a file name: {shard!r}", index_path)
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise FormatError("shard index 'metadata' is not an object", index_path)
    return dict(weight_map), dict(meta)


def member_path(d: str, root: str, name: str, index_path: str, what: str = "shard") -> str:
    """Resolve a file name read from an index or metadata file (``what``: how to call it in
    messages), refusing anything that leaves the directory ``d`` (whose realpath is ``root``)."""
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise FormatError(f"{what} {name!r} is an absolute path; it must be a file inside the directory",
                          index_path)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise FormatError(f"{what} {name!r} points outside the directory", index_path)
    full = os.path.join(d, name)
    try:
        real = os.path.realpath(full, strict=True)
    except FileNotFoundError:
        raise CkptError(f"{what} {name!r} listed in the index is missing", full) from None
    except OSError as e:
        raise CkptError(f"cannot resolve {what} {name!r}: {e.strerror or e}", full) from None
    if os.path.commonpath([root, real]) != root:
        raise FormatError(f"{what} {name!r} resolves outside the directory (to {real})", index_path)
    if not os.path.isfile(real):
        raise CkptError(f"{what} {name!r} is not a regular file", full)
    return real
