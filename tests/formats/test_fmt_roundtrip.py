"""Round trips: every dtype through every format that can hold it, written with
the real libraries and read back through ckptdiff.open_checkpoint."""

from __future__ import annotations

import mmap
import os

import blake3
import numpy as np
import pytest

from ckptdiff.formats import open_checkpoint, sniff
from fmt_helpers import (
    ALL_DTYPES,
    NPY_UNLABELLED,
    dtype_arrays,
    le_bytes,
    make_array,
    write_hdf5,
    write_npz,
    write_safetensors,
    write_sharded,
    write_torch,
)

pytest.importorskip("torch")

EVERY = dtype_arrays()
NPY_OK = dtype_arrays(tuple(n for n in ALL_DTYPES if n not in NPY_UNLABELLED))
# torch's legacy (pre-1.6) serializer predates fp8 and cannot load it back (a torch limitation).
LEGACY_OK = dtype_arrays(tuple(n for n in ALL_DTYPES if not n.startswith("float8")))

WRITERS = {
    "safetensors": (lambda d, a: write_safetensors(os.path.join(d, "m.safetensors"), a), EVERY, "safetensors"),
    "torch": (lambda d, a: write_torch(os.path.join(d, "m.pt"), a), EVERY, "torch"),
    "torch-legacy": (lambda d, a: write_torch(os.path.join(d, "m.bin"), a, legacy=True), LEGACY_OK, "torch-legacy"),
    "hdf5": (lambda d, a: write_hdf5(os.path.join(d, "m.h5"), a), EVERY, "hdf5"),
    "npz": (lambda d, a: write_npz(os.path.join(d, "m.npz"), a), NPY_OK, "npz"),
    "npz-compressed": (lambda d, a: write_npz(os.path.join(d, "m.npz"), a, compressed=True), NPY_OK, "npz"),
    "sharded": (lambda d, a: write_sharded(os.path.join(d, "shards"), a, n_shards=3), EVERY, "safetensors-sharded"),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_dtype_round_trips(tmp_path, fmt):
    write, arrays, expected_format = WRITERS[fmt]
    path = write(str(tmp_path), arrays)
    with open_checkpoint(path) as ck:
        assert ck.format == expected_format
        assert sorted(ck) == sorted(arrays)
        for name, arr in arrays.items():
            ref = ck[name]
            canon = name.split(".")[0]
            assert ref.dtype == canon, name
            assert ref.shape == arr.shape, name
            if name.endswith(".scalar"):
                assert ref.shape == () and ref.numel == 1
            assert ref.nbytes == arr.nbytes
            assert ref.read() == le_bytes(arr), name
            back = ref.numpy()
            assert back.dtype == ALL_DTYPES[canon]
            assert back.shape == arr.shape and back.tobytes() == le_bytes(arr)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_small_chunks_concatenate_to_the_same_bytes(tmp_path, fmt, monkeypatch):
    import ckptdiff.formats._common as common
    monkeypatch.setattr(common, "SLAB_BYTES", 24)  # force many slabs in HDF5 / converted reads
    write, arrays, _ = WRITERS[fmt]
    big = {"float32.big": make_array(np.dtype(np.float32), (9, 13, 5), 7),
           "int16.big": make_array(np.dtype(np.int16), (301,), 8)}
    path = write(str(tmp_path), {**arrays, **big})
    with open_checkpoint(path) as ck:
        for name, ref in ck.items():
            whole = ref.read()
            for size in (1, 5, 64, 1000):
                chunks = [bytes(c) for c in ref.chunks(size)]
                step = max(ref.itemsize, size - size % ref.itemsize)
                assert b"".join(chunks) == whole, (name, size)
                assert all(len(c) == step for c in chunks[:-1]), (name, size)
                assert len(chunks) == (len(whole) + step - 1) // step


def test_same_weights_every_format_identical(tmp_path):
    """The same weights as .pt, .safetensors, .npz, .h5 and a sharded dir: same names, dtypes, shapes, hashes."""
    arrays = NPY_OK
    paths = [
        write_torch(str(tmp_path / "w.pt"), arrays),
        write_safetensors(str(tmp_path / "w.safetensors"), arrays),
        write_npz(str(tmp_path / "w.npz"), arrays),
        write_npz(str(tmp_path / "wc.npz"), arrays, compressed=True),
        write_hdf5(str(tmp_path / "w.h5"), arrays, nested=True),
        write_sharded(str(tmp_path / "sharded"), arrays),
    ]
    seen = []
    for p in paths:
        with open_checkpoint(p) as ck:
            seen.append({n: (r.dtype, r.shape, blake3.blake3(r.read()).hexdigest()) for n, r in ck.items()})
    expected = {n: (n.split(".")[0], a.shape, blake3.blake3(le_bytes(a)).hexdigest()) for n, a in arrays.items()}
    for p, s in zip(paths, seen):
        assert s == expected, p


def test_bf16_and_fp8_identical_across_formats_that_hold_them(tmp_path):
    names = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float32")
    arrays = dtype_arrays(names, seed=3)
    paths = [write_torch(str(tmp_path / "w.pt"), arrays), write_safetensors(str(tmp_path / "w.safetensors"), arrays),
             write_hdf5(str(tmp_path / "w.h5"), arrays), write_sharded(str(tmp_path / "s"), arrays)]
    hashes = []
    for p in paths:
        with open_checkpoint(p) as ck:
            hashes.append({n: (r.dtype, blake3.blake3(r.read()).hexdigest()) for n, r in ck.items()})
    assert all(h == hashes[0] for h in hashes)
    assert {d for d, _ in hashes[0].values()} == set(names)


# ---- safetensors specifics ----------------------------------------------------

def test_safetensors_is_zero_copy_over_an_mmap_and_keeps_metadata(tmp):
    arr = np.arange(1000, dtype=np.float32)
    p = write_safetensors(tmp("a.safetensors"), {"w": arr}, metadata={"step": "12", "note": "hi"})
    ck = open_checkpoint(p)
    buf = ck["w"].buffer()
    assert buf is not None and isinstance(buf.obj, mmap.mmap)
    assert ck.metadata == {"step": "12", "note": "hi"}
    np.testing.assert_array_equal(ck["w"].numpy(), arr)
    del buf
    ck.close()


def test_safetensors_file_with_no_tensors_and_zero_sized_tensors(tmp):
    from fmt_helpers import raw_safetensors
    p = raw_safetensors(tmp("empty.safetensors"), {"__metadata__": {"a": "b"}})
    with open_checkpoint(p) as ck:
        assert len(ck) == 0 and ck.metadata == {"a": "b"}
    hdr = {"z": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
           "s": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
           "z2": {"dtype": "BF16", "shape": [3, 0], "data_offsets": [8, 8]}}
    p = raw_safetensors(tmp("zeros.safetensors"), hdr, (42).to_bytes(8, "little"))
    with open_checkpoint(p) as ck:
        assert ck["z"].shape == (0, 4) and ck["z"].read() == b""
        assert ck["z2"].dtype == "bfloat16" and ck["z2"].read() == b""
        assert int(ck["s"].numpy()) == 42


def test_safetensors_whitespace_padded_header(tmp):
    from fmt_helpers import raw_safetensors
    hb = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}' + b" " * 13
    p = raw_safetensors(tmp("pad.safetensors"), hb, np.array([1.5, -2], np.float32).tobytes())
    with open_checkpoint(p) as ck:
        np.testing.assert_array_equal(ck["w"].numpy(), [1.5, -2])


def test_directory_with_model_safetensors_opens_it(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    write_safetensors(str(d / "model.safetensors"), {"a": np.ones(3, np.float32)})
    with open_checkpoint(str(d)) as ck:
        assert ck.format == "safetensors" and list(ck) == ["a"]


def test_sharded_directory_is_one_checkpoint(tmp_path):
    arrays = {f"layer.{i}.w": make_array(np.dtype(np.float32), (4, i + 1), i) for i in range(7)}
    d = write_sharded(str(tmp_path / "m"), arrays, n_shards=3, metadata={"total_size": 123})
    assert sniff(d) == "safetensors-sharded"
    with open_checkpoint(d) as ck:
        assert ck.format == "safetensors-sharded"
        assert sorted(ck) == sorted(arrays)
        assert ck.metadata["total_size"] == 123
        assert len(ck.metadata["shards"]) == 3
        for n, a in arrays.items():
            np.testing.assert_array_equal(ck[n].numpy(), a)
            assert ck[n].source and ck[n].source.startswith("model-")


# ---- torch specifics ----------------------------------------------------------

def test_torch_nested_training_checkpoint_names_and_metadata(tmp):
    import json

    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    sd = model.state_dict()
    torch.save({"state_dict": sd, "optimizer": opt.state_dict(), "epoch": 7, "best": float("nan"),
                "trainable_keys": ["2.weight", "2.bias"], "history": [0.5, 0.25]}, tmp("ck.pt"))
    with open_checkpoint(tmp("ck.pt")) as ck:
        model_names = set(sd)
        assert model_names <= set(ck)  # the state_dict prefix is gone
        assert "optimizer.state.0.exp_avg" in ck and "optimizer.state.5.exp_avg_sq" in ck
        assert ck["optimizer.state.0.exp_avg"].shape == (3, 4)
        np.testing.assert_array_equal(ck["0.weight"].numpy(), sd["0.weight"].numpy())
        assert ck["1.num_batches_tracked"].dtype == "int64" and ck["1.num_batches_tracked"].shape == ()
        assert ck.metadata["epoch"] == 7
        assert ck.metadata["best"] == "nan"
        assert ck.metadata["history"] == [0.5, 0.25]
        assert ck.metadata["optimizer.param_groups"][0]["lr"] == 1e-3
        json.dumps(ck.metadata, allow_nan=False)  # JSON-safe
        assert ck.manifest is not None and ck.manifest.source == "embedded trainable_keys"
        assert ck.manifest.role("2.weight") == "trainable"
        assert ck.manifest.role("0.weight") == "frozen"


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_torch_wrappers_and_ddp_prefix_are_unwrapped(tmp, wrapper):
    import torch
    sd = {"module.enc.weight": torch.ones(2, 2), "module.enc.bias": torch.zeros(2), "module.head.weight": torch.ones(1)}
    torch.save({wrapper: sd, "trainable_keys": ["module.head.weight"], "extra": {"t": torch.arange(3)}}, tmp("w.pt"))
    with open_checkpoint(tmp("w.pt")) as ck:
        assert sorted(ck) == ["enc.bias", "enc.weight", "extra.t", "head.weight"]
        assert ck.manifest.trainable == ("head.weight",)
        assert ck.metadata["trainable_keys"] == ["head.weight"]
        # tensors outside the state_dict may change freely; the rest of the model is frozen
        assert ck.manifest.role("extra.t") == "buffer"
        assert ck.manifest.role("enc.weight") == "frozen"


def test_torch_flat_state_dict_with_ddp_prefix(tmp):
    import torch
    torch.save({"module.a": torch.ones(2), "module.b.c": torch.ones(3)}, tmp("f.pt"))
    with open_checkpoint(tmp("f.pt")) as ck:
        assert sorted(ck) == ["a", "b.c"] and ck.manifest is None
    # not every key has the prefix: nothing is stripped
    torch.save({"module.a": torch.ones(2), "b": torch.ones(3)}, tmp("g.pt"))
    with open_checkpoint(tmp("g.pt")) as ck:
        assert sorted(ck) == ["b", "module.a"]


def test_torch_shared_storage_views_and_non_contiguous(tmp):
    import torch
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"base": base, "row": base[1], "t": base.t(), "tied": base, "slice": base[:, 2:5],
           "list": [torch.tensor(1.5), (torch.tensor([True, False]),)]}
    torch.save(obj, tmp("v.pt"))
    with open_checkpoint(tmp("v.pt")) as ck:
        assert sorted(ck) == ["base", "list.0", "list.1.0", "row", "slice", "t", "tied"]
        np.testing.assert_array_equal(ck["row"].numpy(), base[1].numpy())
        np.testing.assert_array_equal(ck["t"].numpy(), base.t().numpy())
        np.testing.assert_array_equal(ck["slice"].numpy(), base[:, 2:5].numpy())
        assert ck["t"].read() == base.t().contiguous().numpy().tobytes()
        assert ck["tied"].read() == ck["base"].read()
        assert ck["list.1.0"].dtype == "bool" and ck["list.1.0"].read() == b"\x01\x00"
        assert ck["base"].buffer() is not None  # zero-copy view over torch's mmap


def test_torch_single_tensor_and_unsupported_dtypes_are_listed(tmp):
    import torch
    torch.save(torch.ones(3), tmp("one.pt"))
    with open_checkpoint(tmp("one.pt")) as ck:
        assert list(ck) == ["tensor"]
    torch.save({"w": torch.ones(2), "c": torch.ones(2, dtype=torch.complex64)}, tmp("c.pt"))
    with open_checkpoint(tmp("c.pt")) as ck:
        assert list(ck) == ["w"]
        assert ck.metadata["skipped"][0].startswith("c (torch.complex64")


def test_torch_missing_gives_an_install_hint(tmp, monkeypatch):
    import sys
    # a legacy (pre-1.6) file: no torch-free path can read those
    p = write_torch(tmp("x.pt"), {"a": np.ones(2, np.float32)}, legacy=True)
    monkeypatch.setitem(sys.modules, "torch", None)
    from ckptdiff.errors import CkptError
    with pytest.raises(CkptError) as ei:
        open_checkpoint(p)
    assert "pip install torch" in str(ei.value) and "pip install '.[torch]'" in str(ei.value) and p in str(ei.value)


# ---- HDF5 specifics -----------------------------------------------------------

def test_hdf5_keras_names_attrs_skips_and_big_endian(tmp, monkeypatch):
    import h5py

    import ckptdiff.formats._common as common
    monkeypatch.setattr(common, "SLAB_BYTES", 40)
    kernel = make_array(np.dtype(np.float32), (6, 5), 1)
    with h5py.File(tmp("k.h5"), "w") as f:
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["backend"] = "tensorflow"
        g = f.create_group("model_weights/dense/dense")
        g.create_dataset("kernel:0", data=kernel.astype(">f4"), chunks=(2, 5), compression="gzip")
        g.create_dataset("bias:0", data=np.arange(5, dtype=">i8"))
        f.create_dataset("names", data=np.array([b"a", b"bc"]))
        f.create_dataset("pair", data=np.zeros(2, dtype=[("x", "<i4"), ("y", "<f4")]))
        f.create_dataset("nothing", data=h5py.Empty("f4"))
        f["alias"] = h5py.SoftLink("/model_weights")
    with open_checkpoint(tmp("k.h5")) as ck:
        assert ck.format == "hdf5"
        assert sorted(ck) == ["model_weights.dense.dense.bias:0", "model_weights.dense.dense.kernel:0"]
        ref = ck["model_weights.dense.dense.kernel:0"]
        assert ref.dtype == "float32" and ref.read() == kernel.tobytes()
        assert len(list(ref.pieces())) > 1  # read in slabs, not whole
        assert ck["model_weights.dense.dense.bias:0"].numpy().tolist() == [0, 1, 2, 3, 4]
        assert ck.metadata["keras_version"] == "2.15.0" and ck.metadata["backend"] == "tensorflow"
        assert sorted(s.split(" ")[0] for s in ck.metadata["skipped"]) == ["names", "nothing", "pair"]


def test_slabs_cover_every_element_once_in_c_order():
    from ckptdiff.formats._common import slabs
    for shape in [(), (0,), (3, 0, 2), (7,), (5, 4), (3, 50, 2), (2, 3, 4, 5)]:
        arr = np.arange(int(np.prod(shape)) if shape else 1, dtype=np.int32).reshape(shape)
        for target in (4, 8, 17, 40, 1 << 20):
            parts = [np.asarray(arr[sel]).ravel() for sel in slabs(shape, 4, target)]
            got = np.concatenate(parts) if parts else np.zeros(0, np.int32)
            np.testing.assert_array_equal(got, arr.ravel())
            if shape and target >= 4:
                assert all(p.nbytes <= max(target, 4) for p in parts), (shape, target)


# ---- NumPy specifics ----------------------------------------------------------

def test_npy_fortran_and_big_endian_are_converted(tmp, monkeypatch):
    import ckptdiff.formats._common as common
    monkeypatch.setattr(common, "SLAB_BYTES", 16)
    a = make_array(np.dtype(np.float64), (4, 6, 3), 2)
    np.save(tmp("f.npy"), np.asfortranarray(a))
    np.save(tmp("b.npy"), a.astype(">f8"))
    np.save(tmp("fb.npy"), np.asfortranarray(a.astype(">i4")))
    np.save(tmp("plain.npy"), a)
    for name, expect in [("f", a), ("b", a), ("fb", a.astype(np.int32)), ("plain", a)]:
        with open_checkpoint(tmp(f"{name}.npy")) as ck:
            assert list(ck) == [name]
            assert ck[name].read() == expect.tobytes()
    with open_checkpoint(tmp("plain.npy")) as ck:
        assert isinstance(ck["plain"].buffer().obj, mmap.mmap)


def test_npz_stored_members_are_mmapped_and_compressed_ones_streamed(tmp):
    a = make_array(np.dtype(np.float32), (300, 7), 4)
    np.savez(tmp("s.npz"), w=a, s=np.float16(2.5))
    np.savez_compressed(tmp("c.npz"), w=a, s=np.float16(2.5))
    with open_checkpoint(tmp("s.npz")) as ck:
        assert isinstance(ck["w"].buffer().obj, mmap.mmap)
        assert ck["w"].read() == a.tobytes() and ck["s"].shape == ()
    with open_checkpoint(tmp("c.npz")) as ck:
        assert ck["w"].buffer() is None and ck["w"].pieces is not None
        pieces = list(ck["w"].pieces())
        assert b"".join(bytes(p) for p in pieces) == a.tobytes()
        assert float(ck["s"].numpy()) == 2.5


def test_npz_compressed_fortran_and_big_endian(tmp, monkeypatch):
    import ckptdiff.formats._common as common
    monkeypatch.setattr(common, "SLAB_BYTES", 32)
    a = make_array(np.dtype(np.int32), (5, 9, 2), 6)
    np.savez_compressed(tmp("c.npz"), f=np.asfortranarray(a), b=a.astype(">i4"), fb=np.asfortranarray(a.astype(">i4")))
    with open_checkpoint(tmp("c.npz")) as ck:
        for n in ("f", "b", "fb"):
            assert ck[n].read() == a.tobytes(), n


def test_empty_npz_and_npy_of_empty_array(tmp):
    np.savez(tmp("none.npz"))
    with open_checkpoint(tmp("none.npz")) as ck:
        assert len(ck) == 0
    np.save(tmp("e.npy"), np.zeros((0, 5), np.int8))
    with open_checkpoint(tmp("e.npy")) as ck:
        assert ck["e"].shape == (0, 5) and ck["e"].read() == b""


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_torch_checkpoint_with_numpy_scalars_in_metadata(tmp, numpy_module):
    """Training scripts often save np.float64 metrics; numpy 1.x and 2.x pickles spell the module differently."""
    import zipfile

    import torch
    torch.save({"state_dict": {"w": torch.ones(2)}, "best_acc": np.float64(0.875), "seen": np.arange(3),
                "dt": np.dtype("float16")}, tmp("new.pt"))
    with zipfile.ZipFile(tmp("new.pt")) as zin, zipfile.ZipFile(tmp("np.pt"), "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", numpy_module.encode())
            zout.writestr(info, data)
    with open_checkpoint(tmp("np.pt")) as ck:
        assert list(ck) == ["w"]
        assert ck.metadata == {"best_acc": 0.875, "seen": [0, 1, 2], "dt": "float16"}
        assert type(ck.metadata["best_acc"]) is float


def test_non_torch_formats_do_not_import_torch(tmp):
    """The CLI must stay cheap: opening safetensors/npz must not pull in torch or h5py."""
    import subprocess
    import sys
    p = write_safetensors(tmp("a.safetensors"), {"w": np.ones(3, np.float32)})
    q = write_npz(tmp("a.npz"), {"w": np.ones(3, np.float32)})
    code = ("import sys; from ckptdiff.formats import open_checkpoint\n"
            f"for p in ({p!r}, {q!r}):\n"
            "    with open_checkpoint(p) as ck: ck['w'].read()\n"
            "print(sorted(m for m in ('torch', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_torch_flat_checkpoint_with_optimizer_beside_the_weights(tmp):
    """No wrapper: top-level tensors are the model; the nested optimizer dict is not (and is a buffer)."""
    import torch
    torch.save({"module.enc.weight": torch.ones(2), "module.head.weight": torch.zeros(1),
                "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
                "trainable_keys": ["module.head.weight"], "step": 3}, tmp("flat.pt"))
    with open_checkpoint(tmp("flat.pt")) as ck:
        assert sorted(ck) == ["enc.weight", "head.weight", "optimizer.state.0.exp_avg"]
        assert ck.manifest.role("head.weight") == "trainable"
        assert ck.manifest.role("enc.weight") == "frozen"
        assert ck.manifest.role("optimizer.state.0.exp_avg") == "buffer"
        assert ck.metadata["step"] == 3 and ck.metadata["optimizer.param_groups"] == [{"lr": 0.1}]


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "sharded"])
def test_read_into_streams_the_same_bytes_through_a_reused_buffer(tmp_path, fmt):
    """mmap-backed readers also offer read_into (pread): chunks(into=buf) must match the view."""
    write, arrays, _ = WRITERS[fmt]
    path = write(str(tmp_path), arrays)
    buf = bytearray(64)
    with open_checkpoint(path) as ck:
        for name, ref in ck.items():
            got = b"".join(bytes(c) for c in ref.chunks(64, into=buf))
            assert got == ref.read() == le_bytes(arrays[name]), name
            if ref.nbytes:  # (an empty member needs no reader)
                assert ref.read_into is not None, name
                assert ref.read_into(ref.nbytes, memoryview(bytearray(8))) == 0  # past the end: nothing


def test_npy_read_into_and_descriptors_closed(tmp):
    a = make_array(np.dtype(np.int32), (33, 5), 9)
    np.save(tmp("a.npy"), a)
    before = len(os.listdir("/proc/self/fd"))
    ck = open_checkpoint(tmp("a.npy"))
    got = b"".join(bytes(c) for c in ck["a"].chunks(40, into=bytearray(40)))
    assert got == a.tobytes()
    ck.close()
    assert len(os.listdir("/proc/self/fd")) == before
