"""The dtype table: one canonical name per element type, shared by every format.

Canonical names follow numpy / ml_dtypes spelling (``float32``, ``bfloat16``,
``float8_e4m3fn``), so a tensor saved as ``torch.bfloat16`` in a .pt file and
as ``BF16`` in a .safetensors file compare as the same dtype. bf16 and fp8 are
represented in numpy through ml_dtypes; nothing here imports torch.
"""

from __future__ import annotations

from .errors import FormatError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

    import numpy as np


class DType:
    """One element type. ``np_dtype`` is built on first use, so reading
    headers and comparing identical bytes never imports numpy (~50 ms of a
    CLI run) nor ml_dtypes (bf16/fp8, ~7 ms more)."""

    __slots__ = ("name", "kind", "safetensors", "itemsize", "_np_spec", "_np")

    def __init__(self, name: str, np_spec: str, kind: str, safetensors: str, itemsize: int) -> None:
        self.name = name            # canonical name
        self.kind = kind            # "float", "int", "uint" or "bool"
        self.safetensors = safetensors  # the code used in safetensors headers
        self.itemsize = itemsize
        self._np_spec = np_spec     # "numpy.float32" or "ml_dtypes.bfloat16"
        self._np: np.dtype | None = None

    @property
    def np_dtype(self) -> np.dtype:
        """The little-endian numpy dtype (imports numpy, and ml_dtypes for bf16/fp8)."""
        if self._np is None:
            import importlib

            import numpy as np
            module, attr = self._np_spec.split(".")
            dt = np.dtype(getattr(importlib.import_module(module), attr)).newbyteorder("<")
            assert dt.itemsize == self.itemsize, self.name
            self._np = dt
        return self._np

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def __repr__(self) -> str:
        return f"DType({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __setattr__(self, key: str, value: Any) -> None:
        # Read-only once built, as the frozen table it is (only the cache may fill in).
        if key != "_np" and hasattr(self, key):
            raise AttributeError(f"DType.{key} is read-only")
        object.__setattr__(self, key, value)


_ALL = [
    DType("float64", "numpy.float64", "float", "F64", 8),
    DType("float32", "numpy.float32", "float", "F32", 4),
    DType("float16", "numpy.float16", "float", "F16", 2),
    DType("bfloat16", "ml_dtypes.bfloat16", "float", "BF16", 2),
    DType("float8_e4m3fn", "ml_dtypes.float8_e4m3fn", "float", "F8_E4M3", 1),
    DType("float8_e5m2", "ml_dtypes.float8_e5m2", "float", "F8_E5M2", 1),
    DType("int64", "numpy.int64", "int", "I64", 8),
    DType("int32", "numpy.int32", "int", "I32", 4),
    DType("int16", "numpy.int16", "int", "I16", 2),
    DType("int8", "numpy.int8", "int", "I8", 1),
    DType("uint64", "numpy.uint64", "uint", "U64", 8),
    DType("uint32", "numpy.uint32", "uint", "U32", 4),
    DType("uint16", "numpy.uint16", "uint", "U16", 2),
    DType("uint8", "numpy.uint8", "uint", "U8", 1),
    DType("bool", "numpy.bool_", "bool", "BOOL", 1),
]

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}
_BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ALL}
# torch spells a few differently; everything else is torch.<canonical name>.
_TORCH_ALIASES = {"bool": "bool", "float": "float32", "double": "float64", "half": "float16",
                  "long": "int64", "int": "int32", "short": "int16"}
#: ``torch.<name>`` -> canonical name, for every dtype torch can spell.
TORCH_NAMES: dict[str, str] = {**{n: n for n in DTYPES}, **_TORCH_ALIASES}
#: torch's legacy typed storage classes -> canonical dtype: what the .pt reader
#: accepts and, turned around, what the .pt writer names.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


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
    import numpy as np

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
    if name not in TORCH_NAMES:
        raise FormatError(f"unsupported torch dtype {s}")
    return DTYPES[TORCH_NAMES[name]]
