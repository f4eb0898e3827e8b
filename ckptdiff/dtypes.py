"""The dtype table: one canonical name per element type, shared by every format.

Canonical names follow numpy / ml_dtypes spelling (``float32``, ``bfloat16``,
``float8_e4m3fn``), so a tensor saved as ``torch.bfloat16`` in a .pt file and
as ``BF16`` in a .safetensors file compare as the same dtype. bf16 and fp8 are
represented in numpy through ml_dtypes; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import FormatError


@dataclass(frozen=True)
class DType:
    name: str          # canonical name
    np_dtype: np.dtype  # little-endian numpy dtype
    kind: str          # "float", "int", "uint" or "bool"
    safetensors: str   # the code used in safetensors headers

    @property
    def itemsize(self) -> int:
        return int(self.np_dtype.itemsize)

    @property
    def is_float(self) -> bool:
        return self.kind == "float"


def _d(name: str, np_dtype: object, kind: str, st: str) -> DType:
    return DType(name, np.dtype(np_dtype).newbyteorder("<"), kind, st)


_ALL = [
    _d("float64", np.float64, "float", "F64"),
    _d("float32", np.float32, "float", "F32"),
    _d("float16", np.float16, "float", "F16"),
    _d("bfloat16", ml_dtypes.bfloat16, "float", "BF16"),
    _d("float8_e4m3fn", ml_dtypes.float8_e4m3fn, "float", "F8_E4M3"),
    _d("float8_e5m2", ml_dtypes.float8_e5m2, "float", "F8_E5M2"),
    _d("int64", np.int64, "int", "I64"),
    _d("int32", np.int32, "int", "I32"),
    _d("int16", np.int16, "int", "I16"),
    _d("int8", np.int8, "int", "I8"),
    _d("uint64", np.uint64, "uint", "U64"),
    _d("uint32", np.uint32, "uint", "U32"),
    _d("uint16", np.uint16, "uint", "U16"),
    _d("uint8", np.uint8, "uint", "U8"),
    _d("bool", np.bool_, "bool", "BOOL"),
]

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}
_BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ALL}
# torch spells a few differently; everything else is torch.<canonical name>.
_TORCH_ALIASES = {"bool": "bool", "float": "float32", "double": "float64", "half": "float16",
                  "long": "int64", "int": "int32", "short": "int16"}


def get(name: str) -> DType:
    """The DType for a canonical name; FormatError if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r}") from None


def from_safetensors(code: str) -> DType:
    try:
        return _BY_SAFETENSORS[code]
    except (KeyError, TypeError):
        raise FormatError(f"unsupported safetensors dtype {code!r}") from None


def from_numpy(dt: np.dtype) -> DType:
    """Map a numpy dtype of any byte order to its DType; FormatError if unsupported."""
    dt = np.dtype(dt)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise FormatError(f"unsupported numpy dtype {dt!s} (object, structured and sub-array dtypes are refused)")
    # Match on the scalar type, not on dt.str: ml_dtypes' types print as
    # ambiguous void codes ('<V2' is bfloat16 but also any 2-byte void).
    for d in _ALL:
        if d.np_dtype.type is dt.type:
            return d
    # C-type aliases (np.longlong vs np.int64) are distinct types of the same layout.
    if dt.kind in "biuf":
        for d in _ALL:
            if d.np_dtype.kind == dt.kind and d.itemsize == dt.itemsize:
                return d
    raise FormatError(f"unsupported numpy dtype {dt!s}")


def from_torch(torch_dtype: object) -> DType:
    """Map a torch.dtype (by its string form, so torch need not be imported here)."""
    s = str(torch_dtype)
    name = s[len("torch."):] if s.startswith("torch.") else s
    name = _TORCH_ALIASES.get(name, name)
    if name not in DTYPES:
        raise FormatError(f"unsupported torch dtype {s}")
    return DTYPES[name]
