"""The torch-free .pt fast path must read exactly what torch reads, or step aside.

Every accepted file is compared with torch's own weights-only loader
(names, dtypes, shapes, bytes, metadata, manifest); every unusual file must
raise ``Unsupported`` (so the caller falls back to torch), never guess.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptdiff.checkpoint import Checkpoint  # noqa: E402
from ckptdiff.errors import CkptError  # noqa: E402
from ckptdiff.formats import torch_format  # noqa: E402
from ckptdiff.formats.torch_zip import Unsupported, load, open_torch_zip  # noqa: E402
from ckptdiff.manifest import Manifest  # noqa: E402


def _finish(path, refs, metadata, trainable, *_rest):  # noqa: ANN001, ANN202
    man = Manifest.from_keys(trainable, source="embedded trainable_keys") if trainable is not None else None
    return Checkpoint(path, "torch", refs, metadata, man)


def fast_open(path: str) -> Checkpoint:
    return open_torch_zip(str(path), torch_format._flatten_checkpoint, _finish)


def slow_open(path: str) -> Checkpoint:
    """torch's own loader, bypassing any fast path wired into open_torch."""
    obj = torch_format._load(torch, str(path), False)
    tensors, *rest = torch_format._flatten_checkpoint(torch, obj, str(path))
    refs = {n: torch_format._tensor_ref(torch, n, t, str(path)) for n, t in tensors.items()}
    return _finish(str(path), refs, *rest)


def assert_same(path: str) -> Checkpoint:
    fast, slow = fast_open(path), slow_open(path)
    assert list(fast) == list(slow)
    for name in fast:
        f, s = fast[name], slow[name]
        assert (f.dtype, f.shape) == (s.dtype, s.shape), name
        assert f.read() == s.read(), name
    assert fast.metadata == slow.metadata
    assert (fast.manifest is None) == (slow.manifest is None)
    if fast.manifest is not None:
        assert fast.manifest.to_dict() == slow.manifest.to_dict()
    slow.close()
    return fast


def test_training_checkpoint_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 5)).sum().backward()
    opt.step()
    p = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7,
                "trainable_keys": ["2.weight", "2.bias"], "loss": 0.25, "note": b"raw bytes"}, p)
    ck = assert_same(p)
    assert "2.weight" in ck and "optimizer.state.0.exp_avg" in ck
    assert ck.metadata["epoch"] == 7
    np.testing.assert_array_equal(ck["0.weight"].numpy(), model[0].weight.detach().numpy())
    ck.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_dtype(tmp_path, dtype):
    x = (torch.arange(-6, 6, dtype=torch.float32) * 1.5).to(dtype).reshape(3, 4)
    p = tmp_path / "t.pt"
    torch.save({"x": x, "scalar": x[1, 2].clone(), "empty": x[:0]}, p)
    assert_same(p).close()


def test_views_parameters_shared_storage_and_wrappers(tmp_path):
    base = torch.arange(20.0)
    p = tmp_path / "v.pt"
    torch.save({"module.a": base[3:9], "module.b": base.reshape(4, 5)[1:3], "module.c": base,
                "module.p": torch.nn.Parameter(torch.ones(3)), "module.col": torch.ones(1, 4)}, p)
    ck = assert_same(p)
    assert list(ck) == ["a", "b", "c", "p", "col"]  # DDP prefix peeled, as torch_format does
    np.testing.assert_array_equal(ck["a"].numpy(), np.arange(3.0, 9.0, dtype=np.float32))
    ck.close()
    q = tmp_path / "list.pt"
    torch.save([torch.ones(2), {"x": torch.zeros(3)}], q)
    assert_same(q).close()
    r = tmp_path / "single.pt"
    torch.save(torch.full((2, 2), 3.0), r)
    assert list(assert_same(r)) == ["tensor"]


@pytest.mark.parametrize("make", [
    lambda: {"t": torch.arange(6.0).reshape(2, 3).t()},           # non-contiguous
    lambda: {"c": torch.ones(2, dtype=torch.complex64)},          # complex storage
    lambda: {"s": {1, 2}, "x": torch.ones(1)},                    # builtins.set global
    lambda: {"d": torch.device("cpu"), "x": torch.ones(1)},       # torch.device global
])
def test_unusual_files_step_aside(tmp_path, make):
    p = tmp_path / "u.pt"
    torch.save(make(), p)
    with pytest.raises(Unsupported):
        fast_open(p)
    torch_format.open_torch(str(p)).close()  # and the public reader still opens them


def _rewrite(src, dst, edit):  # noqa: ANN001, ANN202
    """Copy a zip, letting ``edit(name, data) -> (data, compress_type)`` change members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, ctype = edit(info.filename, zin.read(info.filename))
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=ctype)


def test_hostile_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(2)}, good)
    evil_pkl = pickle.dumps({"x": Evil()}, protocol=2)
    bad = tmp_path / "bad.pt"
    _rewrite(good, bad, lambda n, d: (evil_pkl if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    with pytest.raises(Unsupported, match="posix.system|os.system"):
        fast_open(bad)
    with pytest.raises(CkptError):
        torch_format.open_torch(str(bad))  # the fallback refuses it too
    assert not marker.exists()


def test_compressed_or_big_endian_archives_step_aside(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(64)}, good)
    comp = tmp_path / "comp.pt"
    _rewrite(good, comp, lambda n, d: (d, zipfile.ZIP_DEFLATED))
    with pytest.raises(CkptError, match="compressed"):  # torch.save never compresses: refused, not guessed
        load(str(comp))
    big = tmp_path / "big.pt"
    _rewrite(good, big, lambda n, d: (b"big" if n.endswith("byteorder") else d, zipfile.ZIP_STORED))
    with pytest.raises(Unsupported, match="little-endian"):
        load(str(big))


def test_storage_shorter_than_the_tensor_is_a_format_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(64)}, good)
    short = tmp_path / "short.pt"
    _rewrite(good, short, lambda n, d: (d[:100] if "/data/" in n else d, zipfile.ZIP_STORED))
    with pytest.raises(CkptError, match="holds 100 bytes"):
        fast_open(short)


def test_not_a_zip_or_truncated_steps_aside(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(1000)}, good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((Unsupported, CkptError)):
        fast_open(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04" + struct.pack("<26s", b"") + b"\x00" * 10)
    with pytest.raises(CkptError):
        fast_open(junk)


def test_malformed_pickle_steps_aside(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(4)}, good)
    for i, pkl in enumerate([b"\x80\x02}q\x00(X\x01\x00\x00\x00xq", b"garbage", pickle.dumps(io.BytesIO, 2)]):
        bad = tmp_path / f"bad{i}.pt"
        _rewrite(good, bad, lambda n, d, pkl=pkl: (pkl if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
        # malformed streams are refused outright; a foreign global is torch's to judge
        with pytest.raises(Unsupported if i == 2 else CkptError):
            fast_open(bad)


# ---------------------------------------------------------------------------
# the public reader: fast path wired in, torch never imported for plain files
# ---------------------------------------------------------------------------

def test_open_checkpoint_reads_plain_pt_without_importing_torch(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)},
                "epoch": 2, "trainable_keys": ["b"]}, p)
    code = (
        "import sys\n"
        "from ckptdiff.formats import open_checkpoint\n"
        f"with open_checkpoint({str(p)!r}) as ck:\n"
        "    print(ck.format, sorted(ck), ck['w'].numpy().sum(), ck.metadata['epoch'], ck.manifest.role('b'))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")
    assert out[0] == "torch ['b', 'w'] 66.0 2 trainable"
    assert out[1] == "False"


def test_read_into_streams_the_same_bytes_as_the_view(tmp_path):
    p = tmp_path / "r.pt"
    base = torch.arange(1000, dtype=torch.float32)
    torch.save({"a": base[3:700], "b": torch.randn(33, 7).to(torch.bfloat16), "c": base}, p)
    ck = fast_open(p)
    for name, ref in ck.items():
        assert ref.read_into is not None
        for chunk_bytes in (2, 6, 100, 1 << 20):
            buf = bytearray(chunk_bytes)
            streamed = b"".join(bytes(c) for c in ref.chunks(chunk_bytes, into=buf))
            assert streamed == ref.read(), (name, chunk_bytes)
    ck.close()


def test_diff_of_pt_pair_equals_diff_of_the_same_safetensors_pair(tmp_path):
    from safetensors.torch import save_file

    from ckptdiff import diff

    torch.manual_seed(3)
    a = {"emb": torch.randn(300, 64), "norm": torch.ones(64), "head": torch.randn(64, 10).to(torch.bfloat16)}
    b = {k: v.clone() for k, v in a.items()}
    b["emb"][7, :5] += 1e-3
    b["head"][0, 0] = float("nan")
    for side, sd in (("a", a), ("b", b)):
        torch.save(sd, tmp_path / f"{side}.pt")
        save_file(sd, str(tmp_path / f"{side}.safetensors"))
    via_pt = diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt")).to_dict()
    via_st = diff(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")).to_dict()
    assert via_pt["tensors"] == via_st["tensors"]
    assert [t["status"] for t in via_pt["tensors"]] == ["changed", "identical", "changed"]
