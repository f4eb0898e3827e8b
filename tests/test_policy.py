"""The policy's rules, one by one: status, role (with training state), drift under tolerance, stale."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from ckptdiff import policy
from ckptdiff.manifest import Manifest
from ckptdiff.report import TensorDiff


def side(dtype="float32", shape=(2, 3), hash=None):
    return NS(dtype=dtype, shape=shape, hash=hash)


def test_status_checks_presence_then_shape_then_dtype_then_bytes():
    assert policy.status(None, side(), None) == "added"
    assert policy.status(side(), None, None) == "removed"
    assert policy.status(side(shape=(2, 3)), side(dtype="bfloat16", shape=[3, 2]), True) == "shape_changed"
    assert policy.status(side(), side(dtype="bfloat16"), True) == "dtype_changed"
    assert policy.status(side(shape=(2, 3)), side(shape=[2, 3]), None) == "pending"
    assert policy.status(side(), side(), True) == "identical"
    assert policy.status(side(), side(), False) == "changed"


def test_signature_status_agrees_with_status():
    assert policy.signature_status(None, None) == "absent"
    assert policy.signature_status(None, "h|float32|2,3") == "added"
    assert policy.signature_status("h|float32|2,3", None) == "removed"
    assert policy.signature_status("h|float32|2,3", "h|float32|2,3") == "identical"
    assert policy.signature_status("h|float32|2,3", "h|float32|3,2") == "shape_changed"
    assert policy.signature_status("h|float32|2,3", "h|bfloat16|2,3") == "dtype_changed"
    assert policy.signature_status("h|float32|2,3", "g|float32|2,3") == "changed"
    assert policy.signature_status("h", "g") == "changed"  # a bare hash carries no layout


@pytest.mark.parametrize("status,out,drift", [
    ("removed", None, True), ("shape_changed", None, True), ("dtype_changed", None, True),
    ("changed", None, True),   # not measured yet: judged at zero tolerance
    ("changed", 0, False),     # measured, every element within atol + rtol*|old|
    ("changed", 3, True), ("identical", None, False), ("added", None, False), ("pending", None, False),
])
def test_only_a_frozen_tensor_drifts(status, out, drift):
    assert policy.drifts("frozen", status, out) is drift
    for role in ("trainable", "buffer", "unknown"):
        assert policy.drifts(role, status, out) is False


def test_stale_is_a_trainable_identical_tensor_unless_compared_with_itself():
    assert policy.is_stale("trainable", "identical")
    assert not policy.is_stale("trainable", "identical", self_compare=True)
    assert not policy.is_stale("trainable", "changed")
    assert not policy.is_stale("frozen", "identical")
    td = policy.judge(TensorDiff("w", "identical", role="trainable"))
    assert (td.drift, td.stale) == (False, True)


def test_training_state_is_buffers_unless_the_manifest_is_more_specific():
    m = Manifest.from_keys(["head.*"], frozen=["optimizer.state.0.step"])
    roles = policy.roles(m, ["optimizer", "optimizer"])
    assert roles.role("optimizer.state.3.exp_avg") == "buffer"
    assert roles.role("optimizer") == "buffer"
    assert roles.role("optimizer.state.0.step") == "frozen"  # an exact name the user wrote wins
    assert roles.role("backbone.w") == "unknown" and roles.role("head.w") == "trainable"  # frozen is listed
    assert policy.roles(m, []) is m and policy.roles(None, ["optimizer"]) is None
    assert policy.roles(m, ["optimizer"]) is roles  # one instance: its role cache is shared
    assert policy.role(None, "x") == "unknown"


def test_the_manifest_of_a_pair_is_explicit_then_new_then_old():
    a, b, c = Manifest.from_keys(["a"]), Manifest.from_keys(["b"]), Manifest.from_keys(["c"])
    assert policy.pair_manifest(a, b, c) is a
    assert policy.pair_manifest(None, b, c) is c
    assert policy.pair_manifest(None, b, None) is b
    assert policy.pair_manifest(None, None, None, ["optimizer"]) is None
    old, new = NS(manifest=None, auxiliary=("optimizer",)), NS(manifest=c, auxiliary=("scheduler",))
    m = policy.checkpoints_manifest(None, old, new)
    assert m.role("optimizer.x") == m.role("scheduler.last_epoch") == "buffer" and m.role("c") == "trainable"


def test_hash_rows_decide_from_hashes_and_leave_unknown_bytes_pending():
    m = Manifest.from_keys(["head.*"])
    old = {"enc": side(hash="1"), "head": side(hash="2"), "head.b": side(hash="3"), "gone": side(hash="4"),
           "file": side(hash=None)}
    new = {"enc": side(hash="9"), "head": side(hash="2"), "head.b": side(hash="3"), "new": side(hash="5"),
           "file": side(hash="6")}
    rows = {r.name: r for r in policy.hash_rows(old, new, m)}
    assert list(rows) == ["enc", "head", "head.b", "new", "file", "gone"]  # NEW's order, then OLD's leftovers
    assert (rows["enc"].status, rows["enc"].role, rows["enc"].drift) == ("changed", "frozen", True)
    assert rows["enc"].max_abs_delta is None  # no numbers until the engine measures
    assert (rows["head.b"].status, rows["head.b"].stale, rows["head.b"].max_abs_delta) == ("identical", True, 0.0)
    assert (rows["gone"].status, rows["gone"].drift) == ("removed", True)
    assert (rows["file"].status, rows["file"].drift) == ("pending", False)
    assert rows["new"].status == "added" and rows["new"].numel == 6
    same = policy.hash_rows(new, new, m, self_compare=True)
    assert not any(r.stale or r.drift for r in same)


def test_signature_verdicts_look_only_at_frozen_and_trainable_names():
    m = Manifest.from_keys(["head.*"], buffers=["bn.*"])
    old = {"enc": "1|f|2", "gone": "2|f|2", "head.w": "3|f|2", "head.b": "4|f|2", "bn.m": "5|f|2"}
    new = {"enc": "1|f|3", "head.w": "3|f|2", "head.b": "9|f|2", "bn.m": "6|f|2", "added": "7|f|2"}
    assert policy.signature_verdicts(old, new, m) == (["enc", "gone"], ["head.w"])
    assert policy.signature_verdicts(old, new, None) == ([], [])
