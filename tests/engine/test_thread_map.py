"""The engine's thread map: the sequential path's report on any thread count.

Speed work for models of many small tensors that must not change the
report: checked against the sequential path, including which error surfaces
and that every worker stops after one fails.
"""

from __future__ import annotations

import threading

import pytest

from ckptdiff import Checkpoint, CkptError
from ckptdiff import diff
from ckptdiff.engine import _map_tensors
from ckptdiff.report import TensorDiff


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_many_small_tensors_same_report_on_any_thread_count(many_small, workers):
    a, b = many_small(400, 3)
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
