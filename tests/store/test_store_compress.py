"""Compression: lossless, actually smaller on real-looking weights, and safe on hostile blobs."""

from __future__ import annotations

import os
import struct

import ml_dtypes
import numpy as np
import pytest
from store_helpers import ckpt

from ckptdiff.errors import CkptError
from ckptdiff.store import Store, compress


def weights(dtype, n_layers=6, width=256, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"l{i}.weight": (rng.standard_normal((width, width)) * (0.02 * (i + 1))).astype(dtype)
            for i in range(n_layers)}


@pytest.mark.parametrize("dtype,max_ratio", [(np.float32, 0.92), (ml_dtypes.bfloat16, 0.80)])
def test_float_weights_compress_losslessly(tmp_path, dtype, max_ratio):
    sd = weights(dtype)
    raw = sum(a.nbytes for a in sd.values())
    with Store.init(tmp_path / "z", compress=True) as s:
        s.snapshot(ckpt(sd))
        ratio = s.disk_usage() / raw
        with s.open_snapshot("latest") as snap:
            for k, v in sd.items():
                assert snap[k].read() == v.tobytes()
    # byte planes: the exponent plane of normal weights is highly compressible
    assert ratio < max_ratio, ratio


def test_byte_planes_beat_plain_zstd():
    import zstandard

    data = weights(ml_dtypes.bfloat16, n_layers=2)["l1.weight"].tobytes()
    plain = len(zstandard.ZstdCompressor(level=3).compress(data))
    planes = len(zstandard.ZstdCompressor(level=3).compress(compress.split_planes(data, 2)))
    assert planes < plain
    assert compress.join_planes(bytes(compress.split_planes(data, 2)), 2) == data


def test_incompressible_data_is_stored_not_grown(tmp_path):
    noise = np.frombuffer(os.urandom(5 << 20), dtype=np.uint8)
    with Store.init(tmp_path / "z", compress=True) as s:
        s.snapshot(ckpt({"n": noise}))
        frames = -(-noise.nbytes // compress.FRAME_BYTES)
        overhead = compress.HEADER.size + frames * compress.FRAME_HEADER.size + compress.TRAILER_BYTES
        assert s.disk_usage() == noise.nbytes + overhead


def _blob_path(s: Store) -> str:
    (h,) = {e.hash for e in s.entries("latest").values()}
    return os.path.join(s.root, "blobs", h)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:10], "truncated"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "newer"),
    (lambda b: b[:5] + bytes([3]) + b[6:], "byte-plane width"),
    (lambda b: b[:8] + struct.pack("<Q", 1 << 60) + b[16:], "holds"),
    (lambda b: b[:16] + struct.pack("<I", 1 << 31) + b[20:], "frame size"),
    (lambda b: b[:20] + struct.pack("<I", 0xFFFFFFF0) + b[24:], "invalid frame header|truncated"),
    (lambda b: b + b"extra", "trailing"),
    (lambda b: b[:40] + bytes([b[40] ^ 0xFF]) + b[41:], "corrupt|checksum"),
    (lambda b: b[:6] + b"\x01" + b[7:], "damaged header"),
    (lambda b: b[:-1], "checksum"),
])
def test_hostile_compressed_blobs_are_refused(tmp_path, damage, match):
    a = (np.random.default_rng(0).standard_normal(300_000) * 0.01).astype(np.float32)
    with Store.init(tmp_path / "z", compress=True) as s:
        s.snapshot(ckpt({"a": a}))
        p = _blob_path(s)
        data = open(p, "rb").read()  # noqa: SIM115
        os.chmod(p, 0o644)
        with open(p, "wb") as f:
            f.write(damage(data))
        with s.open_snapshot("latest") as snap, pytest.raises(CkptError, match=match):
            snap["a"].read()
        res = s.verify()
        assert not res.ok and res.bad[0].affected == [(s.resolve("latest").id, "a")]
