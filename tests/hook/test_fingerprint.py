"""Unit tests of the bit checksum, the watch's bookkeeping, and the host capture, across dtypes and layouts."""

from __future__ import annotations

import numpy as np
import pytest
from hook_helpers import raw

from ckptdiff import dtypes
from ckptdiff.hook.capture import HostStaging, stream_refs
from ckptdiff.hook.fingerprint import FrozenWatch, _balance, bit_checksum
from ckptdiff.hook.model import Slot

torch = pytest.importorskip("torch")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool]
SHAPES = [(), (0,), (3,), (5, 7), (4, 4, 2)]


def _make(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return x.round().to(dtype)
    return x.to(dtype)


def _expected(t):
    """Reference: the wrapping sum of the bits, in Python ints, over the same word size as bit_checksum."""
    b = raw(t)
    if len(b) % 8 == 0 and t.is_contiguous() and b:
        words = np.frombuffer(b, dtype="<i8")
    else:
        words = np.frombuffer(b, dtype=f"<i{max(1, t.element_size())}") if b else np.zeros(0, np.int64)
    total = sum(int(w) for w in words)
    return (total + 2**63) % 2**64 - 2**63


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_checksum_matches_a_reference_and_sees_one_ulp(dtype, shape):
    t = _make(dtype, shape)
    assert int(bit_checksum(t)) == _expected(t)
    if t.numel() == 0:
        return
    u = t.clone()
    flat = u.view(-1)
    if dtype == torch.bool:
        flat[0] = ~flat[0]
    elif dtype.is_floating_point:
        # flip the lowest mantissa bit of one element: a single-ulp change
        ints = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        ints[0] ^= 1
    else:
        flat[0] += 1
    assert int(bit_checksum(u)) != int(bit_checksum(t))


def test_checksum_of_non_contiguous_views():
    base = _make(torch.float32, (6, 8))
    t = base.t()
    assert not t.is_contiguous()
    # same bytes as its contiguous copy, in any word size: compare against the contiguous element-wise sum
    assert int(bit_checksum(t)) == int(t.contiguous().view(torch.int32).sum(dtype=torch.int64))
    assert int(bit_checksum(base[:, 1:])) == int(base[:, 1:].contiguous().view(torch.int32).sum(dtype=torch.int64))


def _slots(tensors):
    return [Slot([n], t, "param" if isinstance(t, torch.nn.Parameter) else "buffer",
                 dtype=dtypes.from_torch(t.dtype).name) for n, t in tensors.items()]


def test_watch_version_filter_backstop_and_siblings():
    w1 = torch.nn.Parameter(torch.randn(64))
    w2 = torch.nn.Parameter(torch.randn(64))
    stats = torch.zeros(4)  # a small buffer: checksummed every check
    watch = FrozenWatch(_slots({"a.w": w1, "b.w": w2, "b.stats": stats}), backstop_groups=2,
                        owners=["a", "b", "b"])
    watch.set_baseline(0)
    assert watch.suspects() == []
    with torch.no_grad():
        w1.add_(0)  # bumps the version, same values: a suspect, not a drift
    assert watch.suspects() == [0]
    assert watch.collect(watch.launch(1, backstop=False)) == []
    assert watch.suspects() == []  # verified clean: no longer a suspect
    stats.data[0] = 1.0  # invisible to the version counter; caught because small buffers are always summed
    assert watch.collect(watch.launch(2, backstop=False)) == [2]
    watch.mark_drifted(2)
    w2.data[3] += 1.0  # invisible to the version counter: only the rotating backstop sees it
    found = []
    for step in (3, 4):
        p = watch.launch(step)
        found += watch.collect(p) if p is not None else []
    assert found == [1]
    assert watch.last_clean[1] == 0


def test_balance_splits_bytes_evenly():
    sizes = [1000, 10, 500, 500, 10, 10]
    slots = [Slot([f"t{i}"], torch.zeros(n, dtype=torch.uint8), "param", dtype="uint8") for i, n in enumerate(sizes)]
    groups = _balance(slots, 2)
    assert sorted(i for g in groups for i in g) == list(range(6))
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= 30
    assert len(_balance(slots, 50)) == 6  # never more groups than tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_capture_and_stream_refs_give_the_exact_bytes(dtype):
    tensors = {f"t{i}": _make(dtype, s, seed=i) for i, s in enumerate(SHAPES)}
    tensors["nc"] = _make(dtype, (4, 6)).t()  # non-contiguous
    slots = _slots(tensors)
    staging = HostStaging()
    cap = staging.capture(list(enumerate(slots)))
    cap.wait()
    lazy = stream_refs(slots, chunk_bytes=7)
    for s in slots:
        assert cap.refs[s.name].read() == raw(s.tensor)
        assert lazy[s.name].read() == raw(s.tensor)
        assert cap.refs[s.name].shape == tuple(s.tensor.shape)
    assert staging.held_bytes == sum(s.nbytes for s in slots)
    staging.capture([(0, slots[0])])
    assert staging.held_bytes == slots[0].nbytes  # buffers of tensors not captured are released
