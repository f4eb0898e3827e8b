"""The column-by-column diff of two safetensors files gives exactly the report of the ref-by-ref path."""

from __future__ import annotations

import json
import threading

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff import compare, engine
from ckptdiff.checkpoint import Checkpoint, SpanTable
from ckptdiff.manifest import Manifest
from ckptdiff.report import Rows
from ckptdiff.resolve import open_checkpoint


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    for i in range(300):
        t[f"experts.{i}.w"] = rng.standard_normal((4, 3 + i % 5)).astype(np.float32)
        t[f"experts.{i}.b"] = rng.standard_normal(3 + i % 2).astype(ml_dtypes.bfloat16)
    t["embed"] = rng.standard_normal((700, 512)).astype(np.float32)  # 1.4 MB: too big for a run
    t["steps"] = np.arange(6, dtype=np.int64)
    t["half"] = rng.standard_normal(33).astype(np.float16)
    t["scalar"] = np.array(1.5, dtype=np.float32)
    t["reshaped"] = np.ones((2, 6), dtype=np.float32)
    t["retyped"] = np.ones(4, dtype=np.float32)
    t["gone"] = np.zeros(3, dtype=np.float32)
    return t


def _fine_tune(a: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    b = {k: v.copy() for k, v in a.items()}
    for i in range(0, 300, 7):
        b[f"experts.{i}.w"] = b[f"experts.{i}.w"] + np.float32(1e-3)
    b["experts.5.b"] = (b["experts.5.b"].astype(np.float32) * 2).astype(ml_dtypes.bfloat16)
    b["embed"] = b["embed"].copy()
    b["embed"][3, 4] += np.float32(1)
    b["half"] = b["half"] + np.float16(0.5)
    b["reshaped"] = np.ones((3, 4), dtype=np.float32)
    b["retyped"] = np.ones(4, dtype=np.float64)
    del b["gone"]
    b["new"] = rng.standard_normal(5).astype(np.float32)
    return b


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(11)
    a = _model(rng)
    b = _fine_tune(a, rng)
    pa, pb = str(d / "a.safetensors"), str(d / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    same = str(d / "a_copy.safetensors")
    save_file(a, same)
    return pa, pb, same


def _without_kernel(monkeypatch) -> None:
    """The install without the C kernel: runs compared and hashed in Python, memcmp through ctypes."""
    monkeypatch.setattr(compare, "_ckernel", None)
    monkeypatch.setattr(compare, "_EQUAL", None)
    monkeypatch.setattr(compare, "_MEMCMP", compare._load_memcmp())
    monkeypatch.setattr(compare, "_LOCAL", threading.local())  # buffers whose addresses ctypes knows


def _by_refs(ck: Checkpoint) -> Checkpoint:
    """The same checkpoint as a plain dict of refs: the engine's general path."""
    return Checkpoint(ck.path, ck.format, dict(ck.tensors.items()), dict(ck.metadata), ck.manifest)


def _both(pa: str, pb: str, **kw):
    with open_checkpoint(pa) as a, open_checkpoint(pb) as b:
        assert type(a.tensors) is SpanTable and type(b.tensors) is SpanTable
        fast = engine.diff(a, b, **kw)
        slow = engine.diff(_by_refs(a), _by_refs(b), **kw)
    return fast, slow


MANIFEST = Manifest(trainable=["experts.1*", "scalar"], frozen=["*"])


@pytest.mark.parametrize("kernel", ["c", "c-portable", "c-and-package", "python"])
@pytest.mark.parametrize("kw", [
    {},
    {"workers": 2},
    {"manifest": MANIFEST, "atol": 1e-2},
    {"chunk_bytes": 256, "workers": 2, "manifest": MANIFEST},
], ids=["default", "two-workers", "manifest-tolerance", "small-chunks"])
def test_table_path_gives_the_ref_paths_report(pair, monkeypatch, kernel, kw):
    """c: the C kernel hashes every tensor of a run (SIMD code where the CPU has it); c-portable: with its
    portable BLAKE3; c-and-package: tensors above 48 bytes left to the blake3 package; python: no C kernel."""
    if kernel == "python":
        _without_kernel(monkeypatch)
    elif compare._ckernel is None:
        pytest.skip("the C kernel is not built")
    elif kernel == "c-and-package":
        monkeypatch.setattr(compare, "C_HASH_MAX", 48)
    if kernel == "c-portable":
        previous = compare._ckernel._set_simd(0)
        try:
            fast, slow = _both(pair[0], pair[1], **kw)
        finally:
            compare._ckernel._set_simd(previous)
    else:
        fast, slow = _both(pair[0], pair[1], **kw)
    assert isinstance(fast.tensors, Rows) and not isinstance(slow.tensors, Rows)
    assert fast.summary() == slow.summary()
    assert fast.verdict() == slow.verdict()
    assert fast.omitted_identical() == slow.omitted_identical() > 0
    assert json.loads(fast.to_json(identical=False)) == json.loads(slow.to_json(identical=False))
    assert [t.to_dict() for t in fast.tensors] == [t.to_dict() for t in slow.tensors]
    statuses = {t.status for t in slow.tensors}
    assert statuses == {"identical", "changed", "added", "removed", "shape_changed", "dtype_changed"}


def test_same_files_share_names_and_every_row_is_identical(pair):
    with open_checkpoint(pair[0]) as a, open_checkpoint(pair[2]) as b:
        assert b.tensors.names is a.tensors.names  # the second file reuses the first one's name strings
        rep = engine.diff(a, b, manifest=MANIFEST)
    rows = rep.tensors
    assert isinstance(rows, Rows) and rep.summary()["identical"] == len(rows)
    stale = {t.name for t in rep.stale}
    assert stale and all(n.startswith("experts.1") or n == "scalar" for n in stale)
    # Stale rows and tensors too big for a run (compared one by one) are rows; every other
    # identical tensor is a column until asked for.
    listed = {t.name for t in rows.listed()}
    assert listed == stale | {"embed"} and rows.omitted() == len(rows) - len(listed)
    first = rows[0]
    assert first is rows[0] and rows.omitted() == len(rows) - len(listed) - 1  # built once, then kept
    first.cause = "kept"
    assert rows[0].cause == "kept"
    assert [t.name for t in rows[-3:]] == list(a.tensors.names[-3:])
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_names_in_another_order_pair_by_name(tmp_path):
    rng = np.random.default_rng(3)
    a = {f"t{i:03d}": rng.standard_normal(4).astype(np.float32) for i in range(40)}
    pa = tmp_path / "a.safetensors"
    save_file(a, str(pa))
    # A file whose header lists the same tensors in reverse order and whose data lies in another order.
    b = dict(reversed(list(a.items())))
    b["t007"] = b["t007"] + np.float32(1)
    pb = tmp_path / "b.safetensors"
    _write_in_order(pb, b)
    fast, slow = _both(str(pa), str(pb))
    assert [t.to_dict() for t in fast.tensors] == [t.to_dict() for t in slow.tensors]
    assert [t.name for t in fast.changed] == ["t007"]


def _write_in_order(path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file with the header and data in the dict's order (save_file sorts by name)."""
    header, blobs, at = {}, [], 0
    for name, arr in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_tables_from_the_python_header_parser_diff_the_same(pair, monkeypatch):
    from ckptdiff.formats import safetensors_format

    with_c, _ = _both(pair[0], pair[1], manifest=MANIFEST)
    monkeypatch.setattr(safetensors_format, "_cheader", None)
    _without_kernel(monkeypatch)
    with open_checkpoint(pair[0]) as a:
        assert isinstance(a.tensors.offsets, list)  # columns built from the parsed JSON
    without_c, slow = _both(pair[0], pair[1], manifest=MANIFEST)
    assert [t.to_dict() for t in without_c.tensors] == [t.to_dict() for t in slow.tensors] == [
        t.to_dict() for t in with_c.tensors]


@pytest.mark.parametrize("chunk_bytes", [64, 256, 4096, 2 << 20])
def test_same_names_and_offsets_cut_into_runs_by_the_window(tmp_path, chunk_bytes):
    rng = np.random.default_rng(5)
    a = {f"layer.{i:04d}": rng.standard_normal(1 + i % 37).astype(np.float32) for i in range(600)}
    b = {k: (v + np.float32(0.5) if i % 11 == 0 else v) for i, (k, v) in enumerate(a.items())}
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    fast, slow = _both(pa, pb, chunk_bytes=chunk_bytes, workers=2)
    assert [t.to_dict() for t in fast.tensors] == [t.to_dict() for t in slow.tensors]
    assert fast.summary()["changed"] == len(range(0, 600, 11))


STALE_MANIFEST = Manifest(trainable=["experts.1*", "scalar", "steps"], frozen=["*"])


@pytest.mark.parametrize("kernel", ["c", "c-and-package", "python"])
@pytest.mark.parametrize("kw", [{}, {"manifest": STALE_MANIFEST}, {"chunk_bytes": 256, "workers": 2,
                                                                   "manifest": STALE_MANIFEST}],
                         ids=["default", "manifest", "small-chunks"])
def test_without_hash_identical_only_unlisted_rows_go_unhashed(pair, monkeypatch, kernel, kw):
    """hash_identical=False changes nothing a listing shows: rows that differ or are stale keep their hashes."""
    if kernel == "python":
        _without_kernel(monkeypatch)
    elif compare._ckernel is None:
        pytest.skip("the C kernel is not built")
    elif kernel == "c-and-package":
        monkeypatch.setattr(compare, "C_HASH_MAX", 48)
    with open_checkpoint(pair[0]) as a, open_checkpoint(pair[1]) as b:
        for old, new in ((a, b), (_by_refs(a), _by_refs(b))):  # the table path, then the general one
            full = engine.diff(old, new, **kw)
            lean = engine.diff(old, new, hash_identical=False, **kw)
            assert lean.to_json(identical=False) == full.to_json(identical=False)
            unhashed = 0
            for f, t in zip(full.tensors, lean.tensors):
                if f.status != "identical" or f.stale:
                    assert t.to_dict() == f.to_dict()
                else:
                    assert f.hash_old is not None and t.hash_old is None and t.hash_new is None
                    t.hash_old, t.hash_new = f.hash_old, f.hash_new
                    assert t.to_dict() == f.to_dict()
                    unhashed += 1
            assert unhashed == full.omitted_identical() > 0
            assert not kw or len(full.stale) > 3


@pytest.mark.parametrize("where", ["first", "last", "nowhere"])
def test_compare_pair_without_hash_identical_rereads_only_what_differs(tmp_path, where):
    """A streamed pair is compared without hashing; where it differs, the hashed pass gives the usual answer."""
    a = np.arange(50_000, dtype=np.float32)
    b = a.copy()
    if where != "nowhere":
        b[0 if where == "first" else -1] += 1
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"x": a}, pa)
    save_file({"x": b}, pb)
    with open_checkpoint(pa) as ca, open_checkpoint(pb) as cb:
        x, y = _by_refs(ca).tensors["x"], _by_refs(cb).tensors["x"]
        results: dict[bool, compare.PairResult] = {}
        for hashed in (True, False):
            seen: list[int] = []
            results[hashed] = compare.compare_pair(x, y, chunk_bytes=4096, progress=seen.append,
                                                   hash_identical=hashed)
            assert sum(seen) == 2 * a.nbytes  # every byte counted once, the re-read prefix included
    full, lean = results[True], results[False]
    if where == "nowhere":
        assert lean.identical and lean.hash_old is None and lean.hash_new is None and full.hash_old is not None
    else:
        assert (lean.hash_old, lean.hash_new) == (full.hash_old, full.hash_new)
        assert (engine._same_layout("x", x, y, lean, None).to_dict()
                == engine._same_layout("x", x, y, full, None).to_dict())
