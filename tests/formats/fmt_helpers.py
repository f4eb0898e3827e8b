"""Helpers for the format reader tests: deterministic arrays of every dtype,
and writers that use the real libraries (safetensors, torch, h5py, numpy).

Imported by the test modules as ``fmt_helpers`` (pytest puts this folder on
sys.path); fixtures live in conftest.py."""

from __future__ import annotations

import io
import json
import os
import zipfile

import ml_dtypes
import numpy as np

#: Every dtype the readers must carry, as numpy dtypes (bf16/fp8 via ml_dtypes).
ALL_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
#: Types .npy cannot label (numpy writes them as untyped void).
NPY_UNLABELLED = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}


def make_array(dtype: np.dtype, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    if dtype == np.bool_:
        flat = rng.random(n) < 0.5
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)
    else:
        flat = (rng.standard_normal(n) * 3).astype(np.float32).astype(dtype)
    return flat.astype(dtype).reshape(shape).copy(order="C")


def dtype_arrays(names=tuple(ALL_DTYPES), seed: int = 0) -> dict[str, np.ndarray]:
    """For each dtype: a 2-D array, a 0-d scalar and an empty array."""
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        dt = ALL_DTYPES[name]
        out[f"{name}.matrix"] = make_array(dt, (5, 7), seed + i)
        out[f"{name}.scalar"] = make_array(dt, (), seed + 100 + i)
        out[f"{name}.empty"] = make_array(dt, (0, 3), seed + 200 + i)
    return out


def le_bytes(arr: np.ndarray) -> bytes:
    """The byte contract: C order, little-endian."""
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


# ---- writers (real libraries) -------------------------------------------------

def write_safetensors(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
    from safetensors.numpy import save_file
    save_file({k: np.asarray(v).copy(order="C") for k, v in arrays.items()}, path, metadata=metadata)
    return path


def to_torch(arr: np.ndarray):
    import torch
    dt = arr.dtype
    if dt == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    if dt == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(arr.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    if dt == ml_dtypes.float8_e5m2:
        return torch.from_numpy(arr.view(np.uint8).copy()).view(torch.float8_e5m2)
    return torch.from_numpy(arr.copy())


def write_torch(path: str, arrays: dict[str, np.ndarray], legacy: bool = False) -> str:
    import torch
    torch.save({k: to_torch(v) for k, v in arrays.items()}, path, _use_new_zipfile_serialization=not legacy)
    return path


def write_hdf5(path: str, arrays: dict[str, np.ndarray], nested: bool = False) -> str:
    import h5py
    with h5py.File(path, "w") as f:
        for name, arr in arrays.items():
            key = name.replace(".", "/") if nested else name
            if arr.dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
                raw = arr.view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)
                ds = f.create_dataset(key, data=raw)
                ds.attrs["dtype"] = np.bytes_(str(arr.dtype))  # fixed-length ASCII, see hdf5_format
            else:
                f.create_dataset(key, data=arr)
    return path


def write_npz(path: str, arrays: dict[str, np.ndarray], compressed: bool = False) -> str:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_sharded(directory: str, arrays: dict[str, np.ndarray], n_shards: int = 2,
                  metadata: dict | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    names = sorted(arrays)
    weight_map: dict[str, str] = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: arrays[n] for n in names[s::n_shards]}
        write_safetensors(os.path.join(directory, shard), part, metadata={"format": "np"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": metadata or {"total_size": sum(a.nbytes for a in arrays.values())},
             "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return directory


def raw_safetensors(path: str, header: dict | bytes, data: bytes = b"", length: int | None = None) -> str:
    """Write a safetensors file by hand (for malformed and odd headers)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + hb + data)
    return path


def npy_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, **kw)
    return buf.getvalue()


def zip_members(path: str, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> str:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data,
                        compress_type=compression)
    return path


# ---- Hugging Face shard layouts (torch tensors) -----------------------------------

def write_hf_index(d: str, name: str, weight_map: dict, total: int) -> str:
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return path


def write_hf_shards(d: str, sd: dict, kind: str, n: int) -> str:
    """Torch tensors ``sd`` as ``n`` Hugging Face shards of ``kind`` ("safetensors" or "bin"),
    named and indexed as ``save_pretrained`` does; returns the index file's path."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(d, exist_ok=True)
    names = sorted(sd)
    weight_map = {}
    for i in range(n):
        part = {k: sd[k].clone() for k in names[i::n]}
        if kind == "safetensors":
            shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(part, os.path.join(d, shard), metadata={"format": "pt"})
        else:
            shard = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(part, os.path.join(d, shard))
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    return write_hf_index(d, index, weight_map, total)
