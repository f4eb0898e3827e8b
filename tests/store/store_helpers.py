"""Data generators and on-disk measurements shared by the store tests."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from ckptdiff import dtypes
from ckptdiff.checkpoint import Checkpoint
from ckptdiff.store.blobs import BlobDir


def every_dtype(seed: int = 0) -> dict[str, np.ndarray]:
    """One tensor per canonical dtype plus the awkward shapes (0-d, empty, odd sizes).

    Floats include NaN, ±inf and -0.0 so "bit-exact" means bits, not values.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, dt in dtypes.DTYPES.items():
        if dt.kind == "float":
            a = (rng.standard_normal((7, 13)) * 3).astype(np.float32)
            a[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
            out[f"{name}.w"] = a.astype(dt.np_dtype)
        elif dt.kind == "bool":
            out[f"{name}.w"] = rng.integers(0, 2, (5, 3)).astype(bool)
        else:
            info = np.iinfo(dt.np_dtype)
            out[f"{name}.w"] = rng.integers(info.min, info.max, (3, 11), dtype=dt.np_dtype, endpoint=True)
        out[f"{name}.scalar"] = np.array(out[f"{name}.w"].reshape(-1)[1], dtype=dt.np_dtype)
        out[f"{name}.empty"] = np.zeros((0, 4), dtype=dt.np_dtype)
    # Larger than one 4 MiB compression frame, with a ragged last frame.
    out["float32.big"] = (rng.standard_normal(1_100_003) * 0.02).astype(np.float32)
    out["bfloat16.big"] = (rng.standard_normal(2_200_001) * 0.02).astype(ml_dtypes.bfloat16)
    return out


def model(seed: int, *, layers: int = 8, width: int = 128) -> dict[str, np.ndarray]:
    """A small 'transformer-ish' state dict: per-layer weights with per-layer scales."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    for i in range(layers):
        scale = 0.02 * (1 + i / layers)
        sd[f"layers.{i}.attn.weight"] = (rng.standard_normal((width, width)) * scale).astype(np.float32)
        sd[f"layers.{i}.norm.weight"] = np.ones(width, np.float32)
    sd["head.weight"] = (rng.standard_normal((16, width)) * 0.02).astype(np.float32)
    sd["head.bias"] = np.zeros(16, np.float32)
    return sd


def ckpt(arrays: dict[str, np.ndarray]) -> Checkpoint:
    return Checkpoint.from_arrays(arrays)


def blob_files(root: str | os.PathLike[str]) -> dict[str, int]:
    """hash -> stored bytes of every object of the store, loose or packed."""
    return dict(BlobDir(os.fspath(root), compressed=False).scan())


def object_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under blobs/ and packs/ (what a failed write must leave as it was)."""
    out = []
    for d in ("blobs", "packs"):
        p = os.path.join(os.fspath(root), d)
        out += [f"{d}/{n}" for n in sorted(os.listdir(p))] if os.path.isdir(p) else []
    return out


def flip_byte(path: str, offset: int) -> None:
    """Flip one bit of the byte at ``offset`` (blob and pack files are read-only: made writable first)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def blob_bytes(root: str | os.PathLike[str]) -> int:
    return sum(blob_files(root).values())


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
