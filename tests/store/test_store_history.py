"""log's numbers, computed from hashes: changed vs parent and drift vs the first snapshot."""

from __future__ import annotations

from ckptdiff.manifest import Manifest
from ckptdiff.store.history import build_log, changed_between, drifted, effective_manifest
from ckptdiff.store.model import SnapshotInfo


def info(sid, parent, manifest=None):
    return SnapshotInfo(sid, parent, 0.0, None, None, None, {}, manifest, None, 0, 0)


def test_changed_counts_changed_added_and_removed():
    assert changed_between({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "X", "d": "4"}) == 3
    assert changed_between({"a": "1"}, {"a": "1"}) == 0


def test_drift_is_frozen_vs_first_including_vanished():
    m = Manifest.from_keys(["head.*"])
    first = {"head.w": "1", "body.w": "2", "body.b": "3"}
    assert drifted(first, {"head.w": "9", "body.w": "2", "body.b": "3"}, m) == []
    assert drifted(first, {"head.w": "9", "body.w": "8"}, m) == ["body.w", "body.b"]


def test_build_log_inherits_manifests_and_handles_no_manifest():
    m = Manifest.from_keys(["head.*"])
    infos = [info("a", None), info("b", "a", m), info("c", "b"), info("d", None)]
    hashes = {"a": {"head.w": "1", "body": "1"}, "b": {"head.w": "2", "body": "1"},
              "c": {"head.w": "3", "body": "2"}, "d": {"head.w": "1", "body": "5"}}
    rows = build_log(infos, hashes)
    assert [(r.changed, r.drift) for r in rows] == [(None, None), (1, 0), (2, 1), (None, None)]
    assert rows[2].drift_names == ["body"] and rows[2].to_dict()["has_manifest"] is True
    assert rows[0].to_dict()["drift_vs_first"] is None


def test_effective_manifest_survives_a_parent_cycle():
    m = Manifest.from_keys(["x"])
    by_id = {"a": info("a", "b"), "b": info("b", "a")}
    assert effective_manifest("a", by_id) is None
    by_id["c"] = info("c", "a", m)
    assert effective_manifest("c", by_id) is m
