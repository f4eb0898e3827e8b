"""Dedupe, measured in bytes on disk: each distinct byte string is stored once."""

from __future__ import annotations

import numpy as np
from store_helpers import blob_bytes, blob_files, ckpt, model


def test_identical_snapshots_cost_nothing_extra(raw_store):
    sd = model(0)
    logical = sum(a.nbytes for a in sd.values())
    raw_store.snapshot(ckpt(sd))
    one = blob_bytes(raw_store.root)
    # every norm.weight is ones(128): 8 names, one blob
    distinct = {a.tobytes() for a in sd.values()}
    assert one == sum(len(b) for b in distinct)
    assert one < logical
    usage = raw_store.disk_usage()  # the objects plus one pack's header and index
    assert one < usage < one + 4096
    for _ in range(5):
        raw_store.snapshot(ckpt(sd))
    assert blob_bytes(raw_store.root) == one
    assert raw_store.disk_usage() == usage
    assert len(raw_store.list()) == 6


def test_only_changed_bytes_are_added(raw_store):
    sd = model(1)
    raw_store.snapshot(ckpt(sd))
    before = blob_bytes(raw_store.root)
    head = sd["head.weight"]
    for i in range(10):
        sd = dict(sd, **{"head.weight": head + np.float32(i + 1)})
        raw_store.snapshot(ckpt(sd))
    assert blob_bytes(raw_store.root) == before + 10 * head.nbytes


def test_same_bytes_under_a_new_name_or_dtype_share_a_blob(raw_store):
    a = np.arange(256, dtype=np.float32)
    raw_store.snapshot(ckpt({"x": a}))
    files = blob_files(raw_store.root)
    raw_store.snapshot(ckpt({"renamed": a, "as_int": a.view(np.int32), "as_bytes": a.view(np.uint8)}))
    assert blob_files(raw_store.root) == files
    e = raw_store.entries("latest")
    assert e["renamed"].hash == e["as_int"].hash == e["as_bytes"].hash
    assert e["as_bytes"].shape == (1024,) and e["as_int"].dtype == "int32"


def test_compressed_store_also_dedupes(tmp_path):
    from ckptdiff.store import Store

    with Store.init(tmp_path / "z", compress=True) as s:
        sd = model(2)
        s.snapshot(ckpt(sd))
        once = s.disk_usage()
        s.snapshot(ckpt(sd))
        assert s.disk_usage() == once
