"""HDF5 datasets stored plainly are read straight from the file; the bytes must be h5py's.

A contiguous, little-endian dataset is read with ``pread`` at its file
offset (no h5py per read); every other layout goes through h5py. Both
must give exactly the little-endian C-order bytes h5py itself returns.
"""

from __future__ import annotations

import h5py
import numpy as np

from ckptdiff import Checkpoint, diff
from ckptdiff.checkpoint import SpanRef
from ckptdiff.formats import open_checkpoint


def _write(path, arrays):
    with h5py.File(path, "w") as f:
        for name, (arr, kwargs) in arrays.items():
            f.create_dataset(name, data=arr, **kwargs)


def test_plain_datasets_are_read_from_the_file_and_match_h5py(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 33)).astype(np.float32)
    arrays = {
        "plain": (x, {}),
        "big_endian": (x.astype(">f4"), {}),
        "chunked": (x, {"chunks": (8, 33), "compression": "gzip"}),
        "ints": (np.arange(100, dtype=np.int64).reshape(10, 10), {}),
        "scalar": (np.float64(2.5), {}),
    }
    path = tmp_path / "w.h5"
    _write(path, arrays)
    with open_checkpoint(str(path)) as ck, h5py.File(path, "r") as f:
        assert isinstance(ck["plain"], SpanRef) and isinstance(ck["ints"], SpanRef)
        assert not isinstance(ck["big_endian"], SpanRef) and not isinstance(ck["chunked"], SpanRef)
        for name in arrays:
            want = np.ascontiguousarray(f[name][()], dtype=f[name].dtype.newbyteorder("<")).tobytes()
            assert ck[name].read() == want, name
            assert b"".join(bytes(c) for c in ck[name].chunks(256)) == want, name


def test_direct_reads_diff_like_the_same_arrays_in_memory(tmp_path):
    rng = np.random.default_rng(4)
    a = {f"layer{i}.w": rng.standard_normal((32, 16)).astype(np.float32) for i in range(20)}
    b = {k: (v + np.float32(1e-3) if i % 3 == 0 else v) for i, (k, v) in enumerate(a.items())}
    _write(tmp_path / "a.h5", {k: (v, {}) for k, v in a.items()})
    _write(tmp_path / "b.h5", {k: (v, {}) for k, v in b.items()})
    with open_checkpoint(str(tmp_path / "a.h5")) as ca, open_checkpoint(str(tmp_path / "b.h5")) as cb:
        from_files = diff(ca, cb).to_dict()
    in_memory = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b)).to_dict()
    assert from_files["summary"] == in_memory["summary"] and from_files["summary"]["changed"] == 7
    assert sorted(from_files["tensors"], key=lambda t: t["name"]) == sorted(in_memory["tensors"], key=lambda t: t["name"])
