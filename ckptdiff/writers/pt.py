"""Write a ``torch.save``-compatible .pt file without torch, streaming.

The file is what ``torch.save({name: tensor, ...}, path)`` writes with the
zip serialization (the default since torch 1.6): an uncompressed zip
archive holding

* ``archive/data.pkl``: a protocol-2 pickle of a dict whose values are
  ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
  OrderedDict())`` calls (``_rebuild_tensor_v3`` with an ``UntypedStorage``
  and the dtype for dtypes without a legacy storage class: fp8, uint16/32/64,
  as torch itself does); each storage is a persistent id
  ``("storage", StorageClass, key, "cpu", numel)``;
* ``archive/data/<key>``: each tensor's raw little-endian bytes, starting
  64-byte aligned (as torch aligns them, so ``torch.load(mmap=True)`` can map
  them);
* ``archive/version``, ``byteorder``, ``.format_version``,
  ``.storage_alignment`` and ``.data/serialization_id``, as torch writes them.

The pickle is written opcode by opcode (no ``pickle`` of stand-in objects),
naming only globals that ``torch.load(weights_only=True)`` accepts. Tensor
bytes are copied from their source chunk by chunk, so memory stays flat
whatever the model size, and torch need not be installed.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Iterable

from ..checkpoint import TensorRef
from ..dtypes import STORAGE_DTYPES

ARCHIVE = "archive"
ALIGN = 64
#: Tensor dtypes torch pickles with a legacy typed storage class (element counts):
#: the reader's table (dtypes.STORAGE_DTYPES), turned around.
LEGACY_STORAGE = {dtype: cls for cls, dtype in STORAGE_DTYPES.items()}
_PAD_ID = 0xCD64  # a private zip extra-field id; readers skip unknown ids


class _Pickle:
    """Just the protocol-2 opcodes a state dict of tensors needs."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def str(self, s: str) -> None:
        raw = s.encode("utf-8", "surrogatepass")  # as pickle itself writes str
        self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])  # BININT1
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)  # BININT2
        elif -(1 << 31) <= v < (1 << 31):
            self.out += b"J" + struct.pack("<i", v)  # BININT
        else:
            n = (v.bit_length() + 8) // 8
            self.out += b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)  # LONG1

    def ints(self, values: Iterable[int]) -> None:
        """A tuple of ints."""
        self.out += b"("  # MARK
        for v in values:
            self.int(v)
        self.out += b"t"  # TUPLE

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL

    def tensor(self, key: str, t: TensorRef) -> None:
        shape = tuple(t.shape)
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * max(shape[i + 1], 1)
        legacy = LEGACY_STORAGE.get(t.dtype)
        self.glob("torch._utils", "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3")
        self.out += b"(("  # MARK (args), MARK (persistent id)
        self.str("storage")
        if legacy:
            self.glob("torch", legacy)
        else:
            self.glob("torch.storage", "UntypedStorage")
        self.str(key)
        self.str("cpu")
        self.int(t.numel if legacy else t.nbytes)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int(0)  # storage offset
        self.ints(shape)
        self.ints(stride)
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.glob("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE: backward hooks
        if not legacy:
            self.glob("torch", t.dtype)
        self.out += b"tR"  # TUPLE, REDUCE


def data_pkl(tensors: dict[str, TensorRef]) -> bytes:
    p = _Pickle()
    p.out += b"}("  # EMPTY_DICT, MARK
    for i, (name, t) in enumerate(tensors.items()):
        p.str(name)
        p.tensor(str(i), t)
    p.out += b"u."  # SETITEMS, STOP
    return bytes(p.out)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A ZipInfo whose data will start on an ALIGN boundary (padding in the local extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # what ZipFile.open(mode="w") decides from file_size
    assert zf.fp is not None
    start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + (20 if zip64 else 0)
    pad = -(start + 4) % ALIGN
    info.extra = struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
    return info


def write(out: str, tensors: dict[str, TensorRef], chunks: Callable[[TensorRef], Iterable[memoryview | bytes]],
          advance: Callable[[int], None], serialization_id: str) -> None:
    """Write ``tensors`` to the open-for-writing path ``out`` (the caller renames it into place)."""
    with open(out, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        def record(name: str, data: bytes) -> None:
            zf.writestr(_aligned_info(zf, f"{ARCHIVE}/{name}", len(data)), data)

        record("data.pkl", data_pkl(tensors))
        record(".format_version", b"1")
        record(".storage_alignment", str(ALIGN).encode())
        record("byteorder", b"little")
        for i, t in enumerate(tensors.values()):
            with zf.open(_aligned_info(zf, f"{ARCHIVE}/data/{i}", t.nbytes), "w") as w:
                written = 0
                for chunk in chunks(t):
                    w.write(chunk)
                    written += len(chunk)
                    advance(len(chunk))
                if written != t.nbytes:  # a source that under-delivers must not make a short storage
                    raise OSError(f"tensor {t.name!r}: {written} bytes read, {t.nbytes} expected")
        record("version", b"3\n")
        record(".data/serialization_id", serialization_id.encode())
        f.flush()
        os.fsync(f.fileno())


__all__ = ["write", "data_pkl", "LEGACY_STORAGE"]
