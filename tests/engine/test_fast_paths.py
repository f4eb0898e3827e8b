"""The engine's fast paths must give exactly the slow path's answers.

Fast paths under test: identical chunks hashed once (one BLAKE3
state shared until the sides first differ, then forked), tensors spread over
worker threads, whole-tensor handling of small tensors, and ``read_into``
sources streamed through reused buffers instead of mmap views. Each is
checked against an independent reference (blake3 of the full bytes, numpy
float64 statistics) or against the plain sequential path, on data chosen to
be awkward: NaN, -0.0, Inf, changes on chunk boundaries, first/last chunk only.
"""

from __future__ import annotations

import json
import math

import blake3
import ml_dtypes
import numpy as np
import pytest

from ckptdiff import Checkpoint, CkptError, TensorRef
from ckptdiff import diff


def reader_ref(name: str, arr: np.ndarray, *, short: int | None = None) -> TensorRef:
    """A TensorRef whose source offers read_into (as the file readers do), optionally one that runs short."""
    raw = np.ascontiguousarray(arr).tobytes()
    limit = len(raw) if short is None else short
    calls = {"n": 0}

    def read_into(offset: int, buf: memoryview) -> int:
        calls["n"] += 1
        n = max(0, min(buf.nbytes, limit - offset))
        buf[:n] = raw[offset:offset + n]
        return n

    from ckptdiff import dtypes
    dt = dtypes.from_numpy(arr.dtype)
    ref = TensorRef(name, dt.name, arr.shape, view=lambda: memoryview(raw), read_into=read_into)
    ref.calls = calls  # type: ignore[attr-defined]
    return ref


def reader_ck(**arrays: np.ndarray) -> Checkpoint:
    return Checkpoint("<readers>", "memory", {n: reader_ref(n, a) for n, a in arrays.items()})


def ck(**arrays: np.ndarray) -> Checkpoint:
    return Checkpoint.from_arrays(arrays)


def b3(a: np.ndarray) -> str:
    return blake3.blake3(np.ascontiguousarray(a).tobytes()).hexdigest()


def awkward(rng: np.random.Generator, n: int, dtype=np.float32) -> np.ndarray:
    a = (rng.standard_normal(n) * 3).astype(dtype)
    a[::97] = np.array(-0.0, dtype=dtype)
    a[5::211] = np.array(np.inf, dtype=dtype)
    a[7::307] = np.array(np.nan, dtype=dtype)
    return a


def stable(rep) -> dict:  # noqa: ANN001
    d = json.loads(rep.to_json()) if hasattr(rep, "to_json") else rep.to_dict()
    d.pop("elapsed_s", None)
    return d


# ---------------------------------------------------------------------------
# one BLAKE3 state while the sides agree, forked at the first difference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["first", "middle", "last", "boundary", "none"])
@pytest.mark.parametrize("make", [ck, reader_ck])
def test_shared_hash_forks_at_the_first_difference(where, make):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(1000).astype(np.float32)
    b = a.copy()
    chunk_items = 64  # 16 chunks, the last one short
    pos = {"first": 3, "middle": 500, "last": 999, "boundary": 640, "none": None}[where]
    if pos is not None:
        b[pos] = np.nextafter(b[pos], np.float32(np.inf))
    rep = diff(make(t=a), make(t=b), chunk_bytes=chunk_items * 4)
    (t,) = rep.tensors
    assert t.hash_old == b3(a)
    assert t.hash_new == b3(b)
    if pos is None:
        assert t.status == "identical" and t.hash_old == t.hash_new
    else:
        assert t.status == "changed" and t.changed_elements == 1
        assert t.max_abs_delta == pytest.approx(float(abs(np.float64(b[pos]) - np.float64(a[pos]))), rel=0)


def test_known_hash_on_one_side_still_hashes_the_other():
    a = np.arange(100, dtype=np.float32)
    b = a.copy()
    b[50] = -0.0 if a[50] == 0 else -a[50]
    old = Checkpoint("<old>", "memory", {"t": TensorRef("t", "float32", a.shape,
                                                       view=lambda: memoryview(a.tobytes()), hash=b3(a))})
    for new in (ck(t=b), reader_ck(t=b), ck(t=a)):
        (t,) = diff(old, new, chunk_bytes=40).tensors
        assert t.hash_old == b3(a)
        assert t.hash_new == b3(new["t"].numpy())


# ---------------------------------------------------------------------------
# read_into sources: the same answers as views, through reused buffers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int8])
@pytest.mark.parametrize("chunk_bytes", [8, 1000, 4 << 20])
def test_read_into_matches_views(dtype, chunk_bytes):
    rng = np.random.default_rng(2)
    a = {f"t{i}": awkward(rng, n, dtype) if np.dtype(dtype).kind == "f" or dtype is ml_dtypes.bfloat16
         else rng.integers(-100, 100, n).astype(dtype) for i, n in enumerate([1, 17, 300, 4097])}
    b = {k: v.copy() for k, v in a.items()}
    b["t2"][::3] = b["t2"][::3] * np.array(1.5, dtype=dtype) if b["t2"].dtype.kind != "i" else b["t2"][::3] + 1
    b["t3"][-1] = np.array(7, dtype=dtype)
    via_views = diff(ck(**a), ck(**b), chunk_bytes=chunk_bytes)
    via_reads = diff(reader_ck(**a), reader_ck(**b), chunk_bytes=chunk_bytes)
    assert stable(via_views)["tensors"] == stable(via_reads)["tensors"]
    assert [t.status for t in via_reads.tensors] == ["identical", "identical", "changed", "changed"]


def test_read_into_is_really_used_and_chunked():
    a = np.arange(1000, dtype=np.float32)
    old, new = reader_ck(t=a), reader_ck(t=a + 1)
    diff(old, new, chunk_bytes=400)
    assert old["t"].calls["n"] >= 10 and new["t"].calls["n"] >= 10  # type: ignore[attr-defined]


def test_chunks_into_reuses_the_buffer_and_rounds_to_items():
    a = np.arange(10, dtype=np.float64)
    ref = reader_ref("t", a)
    buf = bytearray(64)
    chunks = []
    for c in ref.chunks(30, into=buf):  # rounded down to 24 bytes = 3 items
        assert c.obj is buf or bytes(c) == bytes(memoryview(buf)[:c.nbytes])
        chunks.append(bytes(c))
    assert [len(c) for c in chunks] == [24, 24, 24, 8]
    assert b"".join(chunks) == a.tobytes()
    # a buffer too small, or none, falls back to the view
    assert b"".join(bytes(c) for c in ref.chunks(30, into=bytearray(4))) == a.tobytes()
    assert b"".join(bytes(c) for c in ref.chunks(30)) == a.tobytes()


def test_a_read_into_source_that_runs_short_is_a_ckpt_error():
    a = np.arange(100, dtype=np.float32)
    short = Checkpoint("<short>", "memory", {"t": reader_ref("t", a, short=123)})
    with pytest.raises(CkptError, match="source ended after 123 of 400 bytes"):
        diff(short, reader_ck(t=a + 1), chunk_bytes=64)


# ---------------------------------------------------------------------------
# threads over tensors: the same report as one thread, in the same order
# ---------------------------------------------------------------------------

def test_threads_give_the_sequential_report():
    rng = np.random.default_rng(3)
    sizes = [5, 70_000, 3, 1_000_000, 257, 0, 4096, 123_457]
    a = {f"layer.{i}.w": awkward(rng, n) for i, n in enumerate(sizes)}
    b = {k: v.copy() for k, v in a.items()}
    b["layer.1.w"][1000:2000] += np.float32(1e-3)
    b["layer.3.w"][-1] = np.float32(np.nan)
    b["layer.7.w"][::2] = -b["layer.7.w"][::2]
    b["only.new"] = np.ones(3, np.float32)
    del b["layer.2.w"]
    for make in (ck, reader_ck):
        one = diff(make(**a), make(**b), workers=1, chunk_bytes=1 << 16)
        many = diff(make(**a), make(**b), workers=4, chunk_bytes=1 << 16)
        assert stable(one) == stable(many)
        assert [t.name for t in many.tensors] == list(a) + ["only.new"]
    t1 = next(t for t in one.tensors if t.name == "layer.1.w")
    with np.errstate(invalid="ignore"):
        ref = np.abs(b["layer.1.w"].astype(np.float64) - a["layer.1.w"].astype(np.float64))
    fin = np.isfinite(ref)
    assert t1.max_abs_delta == float(ref[fin].max())
    assert math.isclose(t1.mean_abs_delta, float(ref[fin].sum()) / int(fin.sum()), rel_tol=1e-12)


def test_worker_errors_surface_as_the_same_ckpt_error():
    a = np.arange(100, dtype=np.float32)
    bad = Checkpoint("<short>", "memory", {"x": reader_ref("x", a), "t": reader_ref("t", a, short=8)})
    good = reader_ck(x=a + 1, t=a + 1)
    for workers in (1, 2):
        with pytest.raises(CkptError, match="source ended"):
            diff(bad, good, workers=workers)


def test_progress_from_threads_adds_up():
    a = {f"t{i}": np.arange(1000 * (i + 1), dtype=np.float32) for i in range(6)}
    b = {k: v + 1 for k, v in a.items()}
    seen: list[tuple[int, int]] = []
    diff(ck(**a), ck(**b), chunk_bytes=512, workers=3, progress=lambda d, t: seen.append((d, t)))
    total = 2 * sum(v.nbytes for v in a.values())
    assert seen[-1] == (total, total)
    assert all(t == total for _, t in seen)
    assert all(x[0] <= y[0] for x, y in zip(seen, seen[1:]))


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_are_ckpt_errors(workers):
    with pytest.raises(CkptError, match="workers"):
        diff(ck(t=np.ones(2, np.float32)), ck(t=np.ones(2, np.float32)), workers=workers)


def test_small_tensors_take_the_single_read_path_with_the_same_answers():
    """Tensors under one chunk are read whole; their results must match the streaming loop's."""
    rng = np.random.default_rng(4)
    a = {f"t{i}": awkward(rng, n) for i, n in enumerate([0, 1, 2, 33, 1000, 5000])}
    b = {k: v.copy() for k, v in a.items()}
    for k in ("t2", "t4", "t5"):
        b[k][-1] = np.float32(-0.0) if b[k][-1] != 0 else np.float32(1.0)
    whole = diff(reader_ck(**a), reader_ck(**b), chunk_bytes=1 << 20)   # every tensor fits: single read
    streamed = diff(reader_ck(**a), reader_ck(**b), chunk_bytes=12)     # every tensor streams
    for x, y in zip(stable(whole)["tensors"], stable(streamed)["tensors"]):
        for key in x:  # sums taken in other chunkings may differ in the last ulp
            if isinstance(x[key], float):
                assert math.isclose(x[key], y[key], rel_tol=1e-12), (x["name"], key)
            else:
                assert x[key] == y[key], (x["name"], key)
    for t in whole.tensors:
        assert t.hash_old == b3(a[t.name]) and t.hash_new == b3(b[t.name])
