"""The many-small-tensors paths: the fast indented JSON writer and the thread map.

Both are speed work that must not change a byte of output: the JSON writer
is checked against ``json.dumps(indent=2)`` itself on generated values and on
a real 300-tensor report; the thread map against the sequential path,
including which error surfaces and that every worker stops after one fails.
"""

from __future__ import annotations

import io
import json
import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdiff import Checkpoint, CkptError
from ckptdiff import diff
from ckptdiff.engine import _map_tensors
from ckptdiff.render import dumps_indent2, render, render_json
from ckptdiff.report import TensorDiff

json_scalars = (st.none() | st.booleans() | st.integers() | st.text()
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fast_json_writes_exactly_what_json_dumps_writes(value):
    assert dumps_indent2(value) == json.dumps(value, indent=2, allow_nan=False)


@pytest.mark.parametrize("value", [
    {"x": float("nan")}, [1, float("inf")], {1: "int key"}, {"a": np.float32(1.5)},
    {"a": (1, {2: 3})}, {"s": {1, 2}},
])
def test_fast_json_declines_what_only_json_may_decide(value):
    assert dumps_indent2(value) is None


def test_fast_json_declines_deep_nesting_instead_of_crashing():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert dumps_indent2(deep) is None


def test_tuples_and_odd_strings_match_json():
    value = {"t": (1, 2.5, "x"), "e": [], "d": {}, "odd": "é\u2028\x00\"\\/\U0001f600", "b": [True, False, None]}
    assert dumps_indent2(value) == json.dumps(value, indent=2, allow_nan=False)


def _many(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    a = {f"block.{i}.{kind}": rng.standard_normal(int(rng.integers(1, 3000))).astype(dt)
         for i in range(n) for kind, dt in (("w", np.float32),)}
    b = {k: v.copy() for k, v in a.items()}
    for i, k in enumerate(a):
        if i % 7 == 0:
            b[k] = (b[k] + np.float32(1e-3)).astype(b[k].dtype)
        if i % 50 == 3:
            b[k][0] = np.nan
    del b["block.5.w"]
    b["extra\u00e9|`"] = np.arange(4, dtype=np.int16)
    b["block.9.w"] = b["block.9.w"][:-1].copy()
    return a, b


def test_rendered_json_is_byte_identical_to_the_report_to_json():
    a, b = _many(300, 1)
    rep = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b))
    text = render_json(rep)
    assert text == rep.to_json() + "\n"
    data = json.loads(text)
    assert data["summary"]["removed"] == 1 and data["summary"]["added"] == 1
    assert data["summary"]["shape_changed"] == 1
    nan_rows = [t for t in data["tensors"] if t["nan_new"]]
    assert len(nan_rows) == 6 and all(t["nan_new"] == 1 for t in nan_rows)
    # rel_l2 of a +1e-3 shift against numpy float64.
    k = "block.7.w"
    d = b[k].astype(np.float64) - a[k].astype(np.float64)
    row = next(t for t in data["tensors"] if t["name"] == k)
    assert math.isclose(row["rel_l2"], np.linalg.norm(d) / np.linalg.norm(a[k].astype(np.float64)), rel_tol=1e-12)


def test_render_json_falls_back_to_json_for_non_finite_numbers():
    a, b = _many(12, 2)
    rep = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b))
    rep.atol = float("nan")  # not something the engine makes; json must refuse it, as before
    with pytest.raises(ValueError):
        render_json(rep)


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_many_small_tensors_same_report_on_any_thread_count(workers):
    a, b = _many(400, 3)
    one = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b), workers=1)
    many = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b), workers=workers)
    assert [t.name for t in many.tensors] == [t.name for t in one.tensors]
    strip = lambda r: [t.to_dict() for t in r.tensors]  # noqa: E731
    assert strip(many) == strip(one)


def test_thread_map_keeps_order_and_uses_several_threads():
    names = [f"t{i}" for i in range(200)]
    seen: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)

    def fn(n: str) -> TensorDiff:
        seen.add(threading.current_thread().name)
        if n in ("t0", "t1"):  # the two biggest go first, one per thread: both must be in flight at once
            barrier.wait()
        return TensorDiff(name=n, status="identical")

    sizes = {n: 1000 - i for i, n in enumerate(names)}
    out = _map_tensors(fn, names, sizes, 2)
    assert [t.name for t in out] == names
    assert len(seen) == 2 and threading.current_thread().name not in seen


def test_thread_map_stops_after_the_first_error_and_raises_it():
    names = [f"t{i}" for i in range(500)]
    calls: list[str] = []

    def fn(n: str) -> TensorDiff:
        calls.append(n)
        if n == "t3":
            raise CkptError("broken tensor", "x.safetensors")
        return TensorDiff(name=n, status="identical")

    with pytest.raises(CkptError, match="broken tensor"):
        _map_tensors(fn, names, {n: 0 for n in names}, 3)
    assert len(calls) < len(names)


def test_thread_map_worker_threads_do_not_leak_single_threaded_hashing_to_the_caller():
    from ckptdiff import compare

    _map_tensors(lambda n: TensorDiff(name=n, status="identical"), ["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, 2)
    assert getattr(compare._LOCAL, "hash_threads", True) is True


def test_json_cli_output_equals_to_json(tmp_path):
    from safetensors.numpy import save_file

    a, b = _many(50, 4)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    buf = io.StringIO()
    rep = diff(pa, pb)
    render(rep, "json", buf)
    assert buf.getvalue() == rep.to_json() + "\n"


def test_worker_count_threads_small_tensor_models_only_when_bytes_dominate(monkeypatch):
    from ckptdiff import engine

    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    mib = 1 << 20
    # The benchmark's small2000_lite pair: 2,000 pairs averaging ~244 KiB (both sides).
    assert engine._worker_count(None, 2000 * 244 * 1024, 2000) == 2
    # 5,000 pairs of 32 KiB: Python per tensor dominates, one thread.
    assert engine._worker_count(None, 5000 * 32 * 1024, 5000) == 1
    assert engine._worker_count(None, 4 * mib, 2) == 1          # too little to bother
    assert engine._worker_count(None, 2000 * mib, 60) == 2      # big tensors: one per core
    assert engine._worker_count(3, 10, 1) == 3                  # asked for: given
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 64)
    assert engine._worker_count(None, 2000 * mib, 60) == engine.MAX_WORKERS
