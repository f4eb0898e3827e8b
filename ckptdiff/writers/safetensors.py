"""Write a .safetensors file, streaming: the JSON header, then each tensor's raw bytes.

Bytes are copied as they are (little-endian, the dtype's own width), so
bf16/fp8 never pass through a float conversion and a model larger than
memory writes in chunks. The file is what ``safetensors.save_file`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

from ..checkpoint import TensorRef


def header(tensors: Mapping[str, TensorRef], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and the JSON header, padded so the data section starts 8-byte aligned."""
    out: dict[str, object] = {}
    if metadata:
        out["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in tensors.items():
        out[name] = {"dtype": t.dtype_info.safetensors, "shape": list(t.shape),
                     "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write(write_bytes: Callable[[bytes | memoryview], None], tensors: Mapping[str, TensorRef],
          metadata: Mapping[str, str], chunks: Callable[[TensorRef], Iterable[bytes | memoryview]],
          advance: Callable[[int], None]) -> None:
    """Write the whole file through ``write_bytes``; ``advance(n)`` after each tensor chunk."""
    write_bytes(header(tensors, metadata))
    for t in tensors.values():
        for chunk in chunks(t):
            write_bytes(chunk)
            advance(len(chunk))


__all__ = ["header", "write"]
