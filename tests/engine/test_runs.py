"""Runs: neighbouring small tensors read together, checked against the path they shortcut.

Neighbouring small tensors of real safetensors/.npz/.pt files are read with
one ``pread`` per side and one ``memcmp`` (compare.compare_run); the report
must equal the per-tensor kernel's exactly, whatever the layout.
"""

from __future__ import annotations

import json
import os
import zipfile

import blake3
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff import engine
from ckptdiff import diff
from ckptdiff.errors import CkptError
from ckptdiff.formats import open_checkpoint
from engine_helpers import write_pair


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


def per_tensor_report(pa: str, pb: str, **kw):  # noqa: ANN003, ANN201
    """The same diff with runs switched off (every name its own work item)."""
    plan = engine._plan
    try:
        engine._plan = lambda names, ta, tb, chunk: [[n] for n in names]
        return diff(pa, pb, **kw)
    finally:
        engine._plan = plan


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
