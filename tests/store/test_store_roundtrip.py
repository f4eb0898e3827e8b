"""Exact round trips: what goes into a snapshot comes back bit for bit, by every path out."""

from __future__ import annotations

import os

import numpy as np
import pytest
from store_helpers import ckpt, every_dtype, same_bits

from ckptdiff import dtypes
from ckptdiff.checkpoint import TensorRef
from ckptdiff.errors import CkptError
from ckptdiff.resolve import open_checkpoint
from ckptdiff.manifest import Manifest
from ckptdiff.store import Store, is_store


def test_every_dtype_round_trips_bit_exact(store):
    arrays = every_dtype()
    assert {a.dtype for a in arrays.values()} >= {d.np_dtype for d in dtypes.DTYPES.values()}
    sid = store.snapshot(ckpt(arrays), step=3)
    with store.open_snapshot(sid) as snap:
        assert snap.format == "store"
        assert snap.path == f"{store.root}@{sid}"
        assert list(snap) == list(arrays)  # order kept
        for name, a in arrays.items():
            t = snap[name]
            assert t.hash is not None and len(t.hash) == 64
            got = t.numpy()
            assert same_bits(got, a), name
    # 0-d stays 0-d, empty stays empty
    e = store.entries("latest")
    assert e["int64.scalar"].shape == () and e["int64.scalar"].nbytes == 8
    assert e["bfloat16.empty"].shape == (0, 4) and e["bfloat16.empty"].nbytes == 0


def test_hash_matches_blake3_of_raw_bytes(store):
    from blake3 import blake3

    arrays = every_dtype(1)
    store.snapshot(ckpt(arrays))
    for name, e in store.entries("latest").items():
        assert e.hash == blake3(arrays[name].tobytes()).hexdigest(), name


def test_export_safetensors_and_pt_are_bit_identical(store, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    arrays = every_dtype(2)
    store.snapshot(ckpt(arrays), step=7, tag="t", manifest=Manifest.from_keys(["float32.*"]))
    st = tmp_path / "out.safetensors"
    store.export("t", st)
    pt = tmp_path / "out.pt"
    store.export("t", pt, format="pt")

    def raw(x):
        return x.reshape(-1).view(torch.uint8).numpy().tobytes()

    for loaded in (load_file(st), torch.load(pt, weights_only=True)):
        assert list(loaded) == list(arrays)
        for name, a in arrays.items():
            assert tuple(loaded[name].shape) == a.shape, name
            assert str(loaded[name].dtype) == f"torch.{dtypes.from_numpy(a.dtype).name}", name
            assert raw(loaded[name]) == a.tobytes(), name
    # and our own reader sees the same hashes as the store recorded
    with open_checkpoint(os.fspath(st)) as f:
        assert f.metadata["ckptdiff.step"] == "7"
        for name, e in store.entries("t").items():
            assert same_bits(f[name].numpy(), arrays[name])


def test_export_refuses_to_overwrite_and_bad_format(store, tmp_path):
    store.snapshot(ckpt({"a": np.arange(4, dtype=np.int32)}))
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(CkptError, match="already exists"):
        store.export("latest", out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(CkptError, match="unknown export format"):
        store.export("latest", tmp_path / "y", format="onnx")
    store.export("latest", out, overwrite=True)
    assert out.stat().st_size > 8
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_open_checkpoint_accepts_dir_at_ref(store):
    a = {"w": np.linspace(0, 1, 10, dtype=np.float64)}
    sid = store.snapshot(ckpt(a), tag="base", step=0, metrics={"loss": 0.5})
    assert is_store(store.root)
    for ref in ("latest", "first", "base", sid, sid[:6], "step:0"):
        with open_checkpoint(f"{store.root}@{ref}") as c:
            assert c.metadata["snapshot"] == sid
            assert c.metadata["metrics"] == {"loss": 0.5}
            assert same_bits(c["w"].numpy(), a["w"])


def test_streamed_tensors_without_a_view_are_stored(store):
    """A TensorRef that only yields pieces (HDF5, store blobs) is hashed while written."""
    data = np.arange(1_500_000, dtype=np.float32)
    raw = data.tobytes()

    def pieces():
        for i in range(0, len(raw), 1_000_003):  # odd piece sizes
            yield raw[i:i + 1_000_003]

    ref = TensorRef("x", "float32", data.shape, pieces=pieces)
    store.snapshot({"x": ref})
    with store.open_snapshot("latest") as snap:
        assert snap["x"].read() == raw


def test_known_hash_skips_reading(store):
    a = np.ones(1000, np.float32)
    store.snapshot(ckpt({"a": a}))
    h = store.entries("latest")["a"].hash

    def boom():
        raise AssertionError("read although the hash was known")

    store.snapshot({"a": TensorRef("a", "float32", (1000,), pieces=boom, hash=h)})
    assert store.entries("latest")["a"].hash == h


def test_wrong_known_hash_is_refused(store):
    with pytest.raises(CkptError, match="hash"):
        store.snapshot({"a": TensorRef("a", "float32", (2,), view=lambda: memoryview(b"\0" * 8),
                                       hash="0" * 64)})
    assert store.list() == []


def test_inherit_from_copies_unchanged_entries(store):
    base = {"a": np.zeros(3, np.float32), "b": np.ones(3, np.float32), "c": np.full(3, 2, np.float32)}
    s1 = store.snapshot(ckpt(base))
    s2 = store.snapshot(ckpt({"b": np.full(3, 5, np.float32)}), inherit_from=s1)
    e1, e2 = store.entries(s1), store.entries(s2)
    assert list(e2) == ["a", "b", "c"]
    assert e2["a"] == e1["a"] and e2["c"] == e1["c"] and e2["b"] != e1["b"]
    info = store.resolve(s2)
    assert info.parent == s1 and info.n_tensors == 3 and info.total_bytes == 36


def test_snapshot_from_another_thread(tmp_path):
    import threading

    s = Store.init(tmp_path / "st")
    out: list[object] = []

    def work():
        try:
            out.append(s.snapshot(ckpt({"a": np.arange(5, dtype=np.int16)}), step=1))
        except Exception as e:  # pragma: no cover - reported below
            out.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert isinstance(out[0], str)
    assert [i.id for i in s.list()] == out
    s.close()


def test_metadata_round_trip(store):
    m = Manifest.from_keys(["head.*"], buffers=["bn.*"], source="m.json")
    sid = store.snapshot(ckpt({"x": np.zeros(1, np.uint8)}), step=12, tag="best", message="after lr drop",
                         metrics={"loss": 1.25, "epoch": 3, "note": "ok", "nan": float("nan")},
                         manifest=m, source="/data/ckpt-12.pt", parent=None)
    info = store.resolve("best")
    assert info.id == sid and info.step == 12 and info.tag == "best" and info.message == "after lr drop"
    assert info.metrics["loss"] == 1.25 and info.metrics["epoch"] == 3 and info.metrics["note"] == "ok"
    assert info.metrics["nan"] != info.metrics["nan"]
    assert info.manifest == m and info.manifest.source == "m.json"
    assert info.source == "/data/ckpt-12.pt" and info.parent is None
    assert info.to_dict()["metrics"]["nan"] == "nan"
    with pytest.raises(CkptError, match="metric"):
        store.snapshot(ckpt({"x": np.zeros(1, np.uint8)}), metrics={"bad": [1, 2]})


def test_many_threads_share_one_store(tmp_path):
    """The hook writes from a background thread while others read: one Store, many threads."""
    import threading

    s = Store.init(tmp_path / "st")
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(3):
                s.snapshot(ckpt({"shared": np.ones(1000, np.float32), "own": np.full(1000, k * 10 + i, np.int32)}),
                           step=k * 10 + i)
                s.list()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    infos = s.list()
    assert sorted(i.step for i in infos) == sorted(k * 10 + i for k in range(4) for i in range(3))
    assert s.verify().ok and s.verify().blobs_checked == 13
    s.close()


def test_parallel_writer_keeps_order_and_bytes(tmp_path, monkeypatch):
    from ckptdiff.store import blobs as blobs_mod

    monkeypatch.setattr(blobs_mod, "PARALLEL_MIN_BYTES", 0)
    arrays = {f"t{i:02d}": np.full(1000 + i, i, np.int16) for i in range(40)}
    with Store.init(tmp_path / "st") as s:
        s.snapshot(ckpt(arrays))
        assert list(s.entries("latest")) == list(arrays)
        with s.open_snapshot("latest") as snap:
            assert all(same_bits(snap[k].numpy(), v) for k, v in arrays.items())


def test_tensor_names_are_never_paths(store, tmp_path):
    names = ["../../escape", "/etc/passwd", "a\nb", "ünï/cödé", "x" * 5000, "", "blobs", "ckptdiff.db"]
    arrays = {n: np.full(3, i, np.int8) for i, n in enumerate(names)}
    store.snapshot(ckpt(arrays))
    assert sorted(os.listdir(store.root)) == ["blobs", "ckptdiff.db", "ckptdiff.db-shm", "ckptdiff.db-wal",
                                              "gc.lock", "tmp"]
    assert all(len(f) == 64 for f in os.listdir(os.path.join(store.root, "blobs")))
    assert not (tmp_path / "escape").exists()
    with store.open_snapshot("latest") as snap:
        assert list(snap) == names
        assert all(snap[n].read() == arrays[n].tobytes() for n in names)
    out = tmp_path / "names.safetensors"
    store.export("latest", out)
    with open_checkpoint(os.fspath(out)) as c:
        assert list(c) == names or sorted(c) == sorted(names)


def test_signatures_in_one_query_match_the_validated_entries(raw_store):
    """Store.signatures (the TUI's history columns) says what entries() says, shape for shape."""
    from ckptdiff.tui.history import _signature

    arrays = every_dtype(4)  # 0-d and empty tensors included
    s1 = raw_store.snapshot(ckpt(arrays))
    moved = dict(arrays)
    moved["float32.w"] = arrays["float32.w"] + 1
    s2 = raw_store.snapshot(ckpt(moved))
    sigs = raw_store.signatures()
    assert list(sigs) == [s1, s2]
    for sid in (s1, s2):
        want = {n: _signature(e) for n, e in raw_store.entries(sid).items()}
        assert sigs[sid] == want and list(sigs[sid]) == list(want)  # same strings, same order
    unchanged = [n for n in arrays if n != "float32.w"]
    assert all(sigs[s1][n] is sigs[s2][n] for n in unchanged)  # one string per distinct tensor
    assert sigs[s1]["float32.w"] != sigs[s2]["float32.w"]
    assert sigs[s1]["int64.scalar"].endswith("|int64|")  # a 0-d shape is empty


def test_log_counts_a_reshape_of_the_same_bytes_as_a_change(raw_store):
    """log compares hash, dtype and shape like diff: a frozen tensor reshaped is drift."""
    w = np.arange(12, dtype=np.float32)
    raw_store.snapshot(ckpt({"frozen.w": w.reshape(3, 4), "head.w": w}), manifest=Manifest(trainable=("head.*",)))
    raw_store.snapshot(ckpt({"frozen.w": w.reshape(4, 3), "head.w": w}))
    rows = raw_store.log()
    assert rows[1].changed == 1 and rows[1].drift == 1 and rows[1].drift_names == ["frozen.w"]
