"""Session-2 fast paths of issue 6, each checked against the path it shortcuts.

* Runs: neighbouring small tensors of real safetensors/.npz/.pt files read
  with one ``pread`` per side and one ``memcmp`` (compare.compare_run), which
  must give the per-tensor kernel's report exactly, whatever the layout.
* numpy (and ml_dtypes) load only when a tensor differs: a diff of
  identical safetensors files runs without them.
* Narrow-float statistics skip the finiteness masks until a sum comes out
  non-finite, and take BLAS ``dot`` when OpenBLAS is pinned to one thread:
  same numbers as the general path and an independent float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import blake3
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff import dtypes, engine, stats, stats_numpy
from ckptdiff import diff
from ckptdiff.errors import CkptError
from ckptdiff.formats import open_checkpoint


def stable(rep) -> dict:  # noqa: ANN001
    d = json.loads(rep.to_json())
    d.pop("elapsed_s", None)
    for side in ("old", "new"):
        d[side].pop("path", None)
    return d


def many(seed: int, n: int = 300, dtype=np.float32) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A model of ``n`` small tensors and a fine-tune of it: every 7th moved; for floats
    also a NaN and an Inf born and a 0.0 -> -0.0 flip (bitwise change, zero delta)."""
    rng = np.random.default_rng(seed)
    is_int = np.dtype(dtype).kind in "iu"
    a: dict[str, np.ndarray] = {}
    for i in range(n):
        size = int(rng.integers(1, 3000))
        vals = rng.integers(-1000, 1000, size) if is_int else rng.standard_normal(size) * 0.02
        a[f"blocks.{i // 8}.p{i % 8}"] = vals.astype(dtype)
    b = {k: v.copy() for k, v in a.items()}
    names = list(a)
    for k in names[3::7]:
        b[k] = b[k] + 1 if is_int else (b[k].astype(np.float32) + np.float32(1e-3)).astype(dtype)
    if not is_int:
        b[names[10]][0] = np.nan
        a[names[11]][0] = 0.0
        b[names[11]][0] = -0.0
        b[names[12]][-1] = np.inf
    return a, b


def write_pair(tmp_path, a, b, name="m"):  # noqa: ANN001, ANN201
    pa, pb = tmp_path / f"{name}.a.safetensors", tmp_path / f"{name}.b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return str(pa), str(pb)


def per_tensor_report(pa: str, pb: str, **kw):  # noqa: ANN003, ANN201
    """The same diff with runs switched off (every name its own work item)."""
    plan = engine._plan
    try:
        engine._plan = lambda names, ta, tb, chunk: [[n] for n in names]
        return diff(pa, pb, **kw)
    finally:
        engine._plan = plan


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int16])
@pytest.mark.parametrize("workers", [1, 2])
def test_runs_give_the_per_tensor_report(tmp_path, dtype, workers):
    a, b = many(1, dtype=dtype)
    pa, pb = write_pair(tmp_path, a, b)
    fast = diff(pa, pb, workers=workers)
    slow = per_tensor_report(pa, pb, workers=1)
    assert stable(fast) == stable(slow)
    # and against independent references, not only against ourselves
    by = {t.name: t for t in fast.tensors}
    for k in a:
        assert by[k].hash_old == blake3.blake3(a[k].tobytes()).hexdigest()
        assert by[k].hash_new == blake3.blake3(b[k].tobytes()).hexdigest()
        assert (by[k].status == "identical") == (a[k].tobytes() == b[k].tobytes())
    moved = [t for t in fast.tensors if t.status == "changed"]
    assert len(moved) >= 300 // 7
    if dtype is np.float32:
        nan_born = by[list(a)[10]]
        assert nan_born.nan_new == 1
        assert by[list(a)[12]].inf_new == 1


def test_the_plan_really_groups_small_neighbours(tmp_path):
    a, b = many(2, n=200)
    pa, pb = write_pair(tmp_path, a, b)
    with open_checkpoint(pa) as ca, open_checkpoint(pb) as cb:
        ta, tb = dict(ca.items()), dict(cb.items())
        items = engine._plan(list(ta), ta, tb, 4 << 20)
    assert sorted(n for item in items for n in item) == sorted(a)  # every name exactly once
    assert len(items) <= 3  # 200 tensors of < 12 KB each: one or two runs, not 200 reads
    assert max(len(item) for item in items) > 100


def test_a_run_stops_at_the_chunk_size_and_at_big_gaps(tmp_path):
    rng = np.random.default_rng(3)
    a = {f"t{i:03d}": rng.standard_normal(1000).astype(np.float32) for i in range(40)}  # 4,000 B each
    a["t020"] = rng.standard_normal(600_000).astype(np.float32)  # 2.4 MB in the middle: not in a run
    b = {k: v.copy() for k, v in a.items()}
    b["t005"][3] += 1
    pa, pb = write_pair(tmp_path, a, b)
    with open_checkpoint(pa) as ca, open_checkpoint(pb) as cb:
        ta, tb = dict(ca.items()), dict(cb.items())
        items = engine._plan(list(ta), ta, tb, 16_000)  # room for 4 tensors a run
    assert ["t020"] in items
    runs = [item for item in items if len(item) > 1]
    assert runs and all(len(r) <= 4 for r in runs)
    for r in runs:  # a run never straddles the big tensor
        assert not (min(r) < "t020" < max(r))
    rep = diff(pa, pb, chunk_bytes=16_000)
    assert stable(rep) == stable(per_tensor_report(pa, pb, chunk_bytes=16_000))
    assert [t.name for t in rep.tensors if t.status == "changed"] == ["t005"]


def test_a_different_layout_in_new_falls_back_to_single_tensors(tmp_path):
    """Same tensors, but NEW written in another order: offsets disagree, so no run may pair them up."""
    a, b = many(4, n=60)
    pa = tmp_path / "a.safetensors"
    pb = tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(dict(reversed(list(b.items()))), str(pb))
    with open_checkpoint(str(pa)) as ca, open_checkpoint(str(pb)) as cb:
        ta, tb = dict(ca.items()), dict(cb.items())
        for item in engine._plan(list(ta), ta, tb, 4 << 20):
            if len(item) > 1:
                base = ta[item[0]].file_span[1] - tb[item[0]].file_span[1]
                assert all(ta[n].file_span[1] - tb[n].file_span[1] == base for n in item)
    rep = diff(str(pa), str(pb))
    assert stable(rep) == stable(per_tensor_report(str(pa), str(pb)))


def test_runs_over_npz_and_pt_files(tmp_path):
    torch = pytest.importorskip("torch")
    a, b = many(5, n=80)
    np.savez(tmp_path / "a.npz", **a)
    np.savez(tmp_path / "b.npz", **b)
    rep = diff(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert stable(rep)["tensors"] == stable(per_tensor_report(str(tmp_path / "a.npz"), str(tmp_path / "b.npz")))["tensors"]
    torch.save({k: torch.from_numpy(v) for k, v in a.items()}, tmp_path / "a.pt")
    torch.save({k: torch.from_numpy(v) for k, v in b.items()}, tmp_path / "b.pt")
    rep_pt = diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert stable(rep_pt)["tensors"] == stable(per_tensor_report(str(tmp_path / "a.pt"), str(tmp_path / "b.pt")))["tensors"]
    assert stable(rep_pt)["tensors"] == stable(rep)["tensors"]  # same weights, same answers, any format


def test_a_file_truncated_while_open_is_one_clear_error(tmp_path):
    a, b = many(6, n=50)
    pa, pb = write_pair(tmp_path, a, b)
    with open_checkpoint(pa) as ca, open_checkpoint(pb) as cb:
        size = os.path.getsize(pb)
        os.truncate(pb, size // 2)
        with pytest.raises(CkptError, match="ended|truncated"):
            diff(ca, cb)


# ---------------------------------------------------------------------------
# numpy only when something differs
# ---------------------------------------------------------------------------

_PROBE = """
import sys
from ckptdiff.cli import main
code = main(["diff", sys.argv[1], sys.argv[2], "--format", "json", "-o", sys.argv[3]])
print(code, "numpy" in sys.modules, "ml_dtypes" in sys.modules)
"""


def _probe(pa: str, pb: str, out: str, **env: str) -> tuple[str, str, str]:
    r = subprocess.run([sys.executable, "-c", _PROBE, pa, pb, out], capture_output=True, text=True, check=True,
                       env={**os.environ, **env})
    return tuple(r.stdout.split())  # type: ignore[return-value]


def test_safetensors_diff_never_imports_numpy(tmp_path):
    rng = np.random.default_rng(7)
    a = {"w": rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16),
         "b": rng.standard_normal(64).astype(np.float32)}
    pa, pb = write_pair(tmp_path, a, {k: v.copy() for k, v in a.items()})
    code, has_np, has_ml = _probe(pa, pb, str(tmp_path / "same.json"))
    assert (code, has_np, has_ml) == ("0", "False", "False")
    rep = json.loads((tmp_path / "same.json").read_text())
    w = {t["name"]: t for t in rep["tensors"]}["w"]
    assert w["status"] == "identical" and w["hash_old"] == blake3.blake3(a["w"].tobytes()).hexdigest()
    # differing tensors (bf16 too): the C module measures them, still no numpy;
    # with the numpy fallback forced, numpy loads, and the numbers are the same
    b = {k: v.copy() for k, v in a.items()}
    b["b"][0] += 1
    b["w"][3, 5] = 2.5
    pa, pb = write_pair(tmp_path, a, b, name="moved")
    reports = {}
    for backend, loads in (("auto", "False"), ("numpy", "True")):
        if backend == "auto" and stats.backend() != "c":
            continue  # no C module in this install: the numpy run below still checks the numbers
        out = tmp_path / f"moved-{backend}.json"
        code, has_np, has_ml = _probe(pa, pb, str(out), CKPTDIFF_STATS=backend)
        assert (code, has_np, has_ml) == ("1", loads, loads)
        reports[backend] = {t["name"]: t for t in json.loads(out.read_text())["tensors"]}
    for rep in reports.values():
        assert rep["b"]["changed_elements"] == 1
        assert rep["b"]["max_abs_delta"] == pytest.approx(1.0, rel=1e-6)
        assert rep["w"]["changed_elements"] == 1
        assert rep["w"]["max_abs_delta"] == pytest.approx(abs(2.5 - float(a["w"][3, 5])), rel=1e-12)
    if len(reports) == 2:
        assert reports["auto"]["w"]["rel_l2"] == pytest.approx(reports["numpy"]["w"]["rel_l2"], rel=1e-12)


# ---------------------------------------------------------------------------
# statistics: the finite fast path and BLAS dot agree with the general path
# ---------------------------------------------------------------------------

def reference(a: np.ndarray, b: np.ndarray) -> dict:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both = np.isfinite(a64) & np.isfinite(b64)
    d = np.abs(b64 - a64)[both]
    return {"max": float(d.max()), "mean": float(d.mean()),
            "rel": float(np.sqrt((d * d).sum()) / np.sqrt((a64[both] ** 2).sum())),
            "nan_new": int((np.isnan(b64) & ~np.isnan(a64)).sum())}


def measure(a: np.ndarray, b: np.ndarray, block: int) -> stats.DeltaStats:
    s = stats.DeltaStats(dtypes.from_numpy(a.dtype))
    old = stats_numpy.STATS_BLOCK
    stats_numpy.STATS_BLOCK = block
    try:
        s.add_changed(memoryview(a.view(np.uint8)), memoryview(b.view(np.uint8)))
    finally:
        stats_numpy.STATS_BLOCK = old
    return s


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
@pytest.mark.parametrize("dot", [False, True])
def test_finite_fast_path_and_dot_match_the_reference(monkeypatch, stats_backend, dtype, dot):
    monkeypatch.setattr(stats_numpy, "_DOT_OK", dot)
    rng = np.random.default_rng(11)
    a = (rng.standard_normal(5000) * 0.5).astype(dtype)
    b = (a.astype(np.float32) + rng.standard_normal(5000).astype(np.float32) * 0.01).astype(dtype)
    b[4000:] = a[4000:]  # the last blocks identical: they only add to ||old||
    ref = reference(a, b)
    s = measure(a, b, 1024)
    assert math.isclose(s.max_abs_delta, ref["max"], rel_tol=1e-12)
    assert math.isclose(s.mean_abs_delta, ref["mean"], rel_tol=1e-9)
    assert math.isclose(s.rel_l2, ref["rel"], rel_tol=1e-9)
    assert s.changed_elements == int((a.view(np.uint8 if a.itemsize == 1 else np.uint16 if a.itemsize == 2
                                            else np.uint32) != b.view(np.uint8 if a.itemsize == 1 else np.uint16
                                                                        if a.itemsize == 2 else np.uint32)).sum())


@pytest.mark.parametrize("where", [0, 1500, 4999])
def test_a_nan_in_one_block_falls_back_for_that_block_only(stats_backend, where):
    rng = np.random.default_rng(12)
    a = rng.standard_normal(5000).astype(np.float32)
    b = a + np.float32(0.25)
    b[where] = np.nan
    a[(where + 7) % 5000] = np.inf  # and an Inf in OLD only (b was computed before it)
    ref = reference(a, b)
    s = measure(a, b, 1024)
    assert s.nan_new == ref["nan_new"] == 1
    assert s.finite_both == int((np.isfinite(a) & np.isfinite(b)).sum()) == 4998
    assert math.isclose(s.max_abs_delta, ref["max"], rel_tol=1e-12)
    assert math.isclose(s.mean_abs_delta, ref["mean"], rel_tol=1e-9)
    assert math.isclose(s.rel_l2, ref["rel"], rel_tol=1e-9)


def test_the_cli_pins_openblas_to_one_thread_only_before_numpy_loads(tmp_path):
    probe = ("import os, sys\nfrom ckptdiff.cli import main\nmain(['--version'])\n"
             "print(os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout
    assert out.strip().splitlines()[-1] in ("1", "None")  # --version exits in argparse before the pin
    probe = ("import os, sys\nfrom ckptdiff.cli import main\nmain(['diff', sys.argv[1], sys.argv[1], '-q'])\n"
             "print(os.environ.get('OPENBLAS_NUM_THREADS'))\nimport ckptdiff.stats_numpy as s\nprint(s._DOT_OK)")
    a = {"w": np.ones(3, np.float32)}
    pa, _ = write_pair(tmp_path, a, a)
    out = subprocess.run([sys.executable, "-c", probe, pa], capture_output=True, text=True, env=env).stdout.split()
    assert out == ["1", "True"]
    env["OPENBLAS_NUM_THREADS"] = "2"  # a user's own setting wins, and then einsum is used
    out = subprocess.run([sys.executable, "-c", probe, pa], capture_output=True, text=True, env=env).stdout.split()
    assert out == ["2", "False"]


def test_npz_with_zip64_or_compression_still_diffs(tmp_path):
    """Compressed .npz members have no file span: they must keep the streaming path."""
    a, b = many(8, n=20)
    with zipfile.ZipFile(tmp_path / "a.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k, v in a.items():
            with z.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v)
    np.savez(tmp_path / "b.npz", **b)
    rep = diff(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    by = {t.name: t for t in rep.tensors}
    for k in a:
        assert by[k].hash_old == blake3.blake3(a[k].tobytes()).hexdigest()
        assert (by[k].status == "identical") == (a[k].tobytes() == b[k].tobytes())


def test_pt_diff_imports_neither_numpy_nor_torch(tmp_path):
    """A zip .pt pair with changed fp32 and bf16 tensors: ckptdiff's own zip reader
    and the C statistics module, so neither numpy nor torch loads."""
    if stats.backend() != "c":
        pytest.skip("the C statistics module is not in use (not built, or CKPTDIFF_STATS=numpy) (numpy measures instead)")
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(64, 64, generator=g), "h": torch.randn(32, generator=g).to(torch.bfloat16)}
    b = {"w": a["w"].clone(), "h": a["h"].clone()}
    b["w"][1, 2] += 0.5
    b["h"][4] = 7.0
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    probe = ("import sys\nfrom ckptdiff.cli import main\n"
             "code = main(['diff', sys.argv[1], sys.argv[2], '--format', 'json', '-o', sys.argv[3]])\n"
             "print(code, 'numpy' in sys.modules, 'torch' in sys.modules)")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), str(out)],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["1", "False", "False"]
    rep = {t["name"]: t for t in json.loads(out.read_text())["tensors"]}
    assert rep["w"]["changed_elements"] == 1
    assert rep["w"]["max_abs_delta"] == pytest.approx(0.5, rel=1e-6)
    assert rep["h"]["changed_elements"] == 1
    assert rep["h"]["max_abs_delta"] == pytest.approx(abs(7.0 - float(a["h"][4])), rel=1e-12)
