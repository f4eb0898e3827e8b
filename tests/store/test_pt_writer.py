"""``export --format pt`` writes torch.save's zip layout itself: streamed, without torch.

Checked against torch itself (plain and mmap loads, weights_only), against
ckptdiff's own .pt reader, for 64-byte aligned storages, for the zip64 path,
for memory that stays flat, and in a process where torch cannot be imported.
"""

from __future__ import annotations

import os
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from store_helpers import ckpt, every_dtype, same_bits

from ckptdiff.checkpoint import Checkpoint, TensorRef
from ckptdiff.formats import open_checkpoint
from ckptdiff.store import Store
from ckptdiff.writers import pt as pt_writer


def data_offsets(path) -> dict[str, int]:  # noqa: ANN001
    """Where each member's bytes start, read from its local header."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(path) as z:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            assert head[:4] == b"PK\x03\x04"
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out[info.filename] = info.header_offset + 30 + name_len + extra_len
    return out


def test_torch_loads_every_dtype_bit_exact_plain_and_mmap(raw_store, tmp_path):
    torch = pytest.importorskip("torch")
    arrays = every_dtype(3)
    raw_store.snapshot(ckpt(arrays), tag="t")
    out = tmp_path / "out.pt"
    raw_store.export("t", out, format="pt")
    for kw in ({}, {"mmap": True}):
        loaded = torch.load(out, weights_only=True, **kw)
        assert list(loaded) == list(arrays)
        for name, a in arrays.items():
            t = loaded[name]
            assert tuple(t.shape) == a.shape and t.is_contiguous(), name
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == a.tobytes(), name
    # every storage starts 64-byte aligned, like torch.save's own
    offsets = data_offsets(out)
    data = [n for n in offsets if "/data/" in n]
    assert len(data) == len(arrays) and all(offsets[n] % 64 == 0 for n in data)
    # ckptdiff's own .pt reader (no torch) sees the same bytes
    with open_checkpoint(os.fspath(out)) as f:
        assert f.format == "torch"
        for name, a in arrays.items():
            assert same_bits(f[name].numpy(), a), name
    # and it diffs identical to the snapshot it came from
    from ckptdiff import diff

    rep = diff(f"{raw_store.root}@t", os.fspath(out))
    assert {t.status for t in rep.tensors} == {"identical"}


def test_the_same_records_as_torch_save(raw_store, tmp_path):
    torch = pytest.importorskip("torch")
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    raw_store.snapshot(ckpt(arrays))
    ours = tmp_path / "ours.pt"
    raw_store.export("latest", ours, format="pt")
    theirs = tmp_path / "theirs.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, theirs)

    def records(p):  # noqa: ANN001, ANN202
        with zipfile.ZipFile(p) as z:
            return sorted(n.split("/", 1)[1] for n in z.namelist())

    assert records(ours) == records(theirs)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        for rec in ("version", "byteorder", ".format_version", ".storage_alignment", "data/0"):
            assert a.read(f"archive/{rec}") == b.read(f"theirs/{rec}"), rec
        assert len(a.read("archive/.data/serialization_id")) == 40
        assert all(info.compress_type == zipfile.ZIP_STORED for info in a.infolist())


def test_pickle_holds_big_dimensions_exactly():
    """Dims past 65,535 and element counts past 2**31 take the wider int opcodes."""
    refs = {
        "wide": TensorRef("wide", "float32", (3, 100_000), pieces=lambda: iter(())),
        "huge": TensorRef("huge", "uint8", (70_000, 40_000), pieces=lambda: iter(())),
        "fp8": TensorRef("fp8", "float8_e5m2", (5,), pieces=lambda: iter(())),
        "scalar": TensorRef("scalar", "int64", (), pieces=lambda: iter(())),
    }
    raw = pt_writer.data_pkl(refs)
    ops = [(op.name, arg) for op, arg, _pos in pickletools.genops(raw)]
    ints = [arg for name, arg in ops if name in ("BININT1", "BININT2", "BININT", "LONG1")]
    assert 2_800_000_000 in ints and 100_000 in ints and 70_000 in ints  # numel of 'huge', dims
    globs = {arg for name, arg in ops if name == "GLOBAL"}
    assert globs == {"torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3", "torch FloatStorage",
                     "torch ByteStorage", "torch.storage UntypedStorage", "torch float8_e5m2",
                     "torch LongStorage", "collections OrderedDict"}
    assert ops[-1][0] == "STOP"


def test_zip64_members_stay_aligned_and_load(raw_store, tmp_path, monkeypatch):
    """Tensors over ~2 GiB get zip64 headers; forced here by lowering the limit."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    arrays = {"a": np.arange(1000, dtype=np.float32), "b": np.arange(7, dtype=np.int16)}
    raw_store.snapshot(ckpt(arrays))
    out = tmp_path / "z64.pt"
    raw_store.export("latest", out, format="pt")
    monkeypatch.undo()
    offsets = data_offsets(out)
    assert all(off % 64 == 0 for name, off in offsets.items() if "/data/" in name)
    loaded = torch.load(out, weights_only=True)
    assert loaded["a"].numpy().tobytes() == arrays["a"].tobytes()
    assert loaded["b"].numpy().tobytes() == arrays["b"].tobytes()


def test_export_streams_with_flat_memory(raw_store, tmp_path):
    """64 MiB of tensors export with a few MiB of Python allocations (torch.save needed it all)."""
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.standard_normal(1 << 21).astype(np.float32) for i in range(8)}  # 8 x 8 MiB
    raw_store.snapshot(ckpt(arrays))
    del arrays
    tracemalloc.start()
    try:
        raw_store.export("latest", tmp_path / "big.pt", format="pt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert os.path.getsize(tmp_path / "big.pt") > 64 << 20


def test_export_pt_works_without_torch(tmp_path):
    root = tmp_path / "s"
    with Store.init(root) as st:
        st.snapshot(Checkpoint.from_arrays({"w": np.linspace(0, 1, 5, dtype=np.float32)}), tag="x")
    code = ("import sys; sys.modules['torch'] = None\n"  # any 'import torch' now fails
            "from ckptdiff.cli import main\n"
            "rc = main(['export', sys.argv[1] + '@x', sys.argv[2], '--format', 'pt'])\n"
            "rc2 = main(['diff', sys.argv[1] + '@x', sys.argv[2], '-q'])  # read back by ckptdiff's own reader\n"
            "print(rc, rc2, 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = tmp_path / "w.pt"
    p = subprocess.run([sys.executable, "-c", code, str(root), str(out)], capture_output=True, text=True, timeout=120)
    assert p.stdout.split()[-3:] == ["0", "0", "False"], p.stderr
    with open_checkpoint(os.fspath(out)) as f:
        assert f["w"].numpy().tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])


def test_a_corrupt_blob_fails_the_export_and_leaves_nothing(raw_store, tmp_path):
    arrays = {"w": np.arange(4096, dtype=np.float32)}
    raw_store.snapshot(ckpt(arrays))
    (h,) = {e.hash for e in raw_store.entries("latest").values()}
    path = raw_store.blobs.path(h)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    from ckptdiff.errors import CkptError

    with pytest.raises(CkptError):
        raw_store.export("latest", tmp_path / "bad.pt", format="pt")
    assert os.listdir(tmp_path) == ["store"]
