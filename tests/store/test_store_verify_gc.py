"""verify finds every flipped byte; gc frees exactly the unreferenced blobs; rm keeps roles."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from store_helpers import blob_files, ckpt, every_dtype, flip_byte, model

from ckptdiff.cli import main
from ckptdiff.errors import CkptError
from ckptdiff.manifest import Manifest
from ckptdiff.store import store as store_mod


def test_a_flipped_byte_in_any_blob_is_found(store, capsys):
    arrays = every_dtype(5)
    s1 = store.snapshot(ckpt(arrays), step=1)
    arrays2 = dict(arrays, **{"float32.w": arrays["float32.w"] * 2})
    s2 = store.snapshot(ckpt(arrays2), step=2)
    assert store.verify().ok
    users: dict[str, list[tuple[str, str]]] = {}
    for sid in (s1, s2):
        for name, e in store.entries(sid).items():
            users.setdefault(e.hash, []).append((sid, name))
    rnd = random.Random(7)
    files = blob_files(store.root)
    originals = {}
    flipped = set()
    for h, size in files.items():
        if size == 0:
            continue  # an empty tensor's blob has no byte to flip
        path, off, length = store.blobs.locate(h)  # a loose file, or the object's span in a pack
        originals.setdefault(path, open(path, "rb").read())  # noqa: SIM115
        flip_byte(path, off + rnd.randrange(length))  # one byte, anywhere: header, frame, payload or trailer
        flipped.add(h)
    assert len(flipped) == sum(1 for v in files.values() if v) >= 30
    res = store.verify()
    assert not res.ok
    assert {b.hash for b in res.bad} == flipped  # every one, separately
    for bad in res.bad:
        assert sorted(bad.affected) == sorted(users[bad.hash])
    # the CLI names every snapshot and tensor and exits 1
    assert main(["verify", store.root]) == 1
    out = capsys.readouterr().out
    for h in res.bad:
        for sid, name in users[h.hash]:
            assert f"snapshot {sid}  tensor {name}" in out
    for path, data in originals.items():
        with open(path, "wb") as f:
            f.write(data)
    assert store.verify().ok


def test_missing_blob_and_corrupt_read_paths(raw_store, tmp_path):
    # "w" is big enough to be a loose blob file (a missing pack: test_store_packs)
    a = {"w": np.arange(20_000, dtype=np.float32), "v": np.ones(10, np.float64)}
    raw_store.snapshot(ckpt(a), tag="x")
    hw = raw_store.entries("x")["w"].hash
    path = os.path.join(raw_store.root, "blobs", hw)
    flip_byte(path, 10)
    with raw_store.open_snapshot("x") as snap:
        with pytest.raises(CkptError, match="corrupt"):
            snap["w"].read()
        assert snap["v"].read() == a["v"].tobytes()
    out = tmp_path / "o.safetensors"
    with pytest.raises(CkptError, match="corrupt"):
        raw_store.export("x", out)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    os.unlink(path)
    res = raw_store.verify()
    assert [(b.problem, b.affected) for b in res.bad] == [("missing", [(raw_store.resolve("x").id, "w")])]
    with raw_store.open_snapshot("x") as snap, pytest.raises(CkptError, match="missing"):
        snap["w"].read()


def test_gc_keeps_every_referenced_blob(raw_store):
    sds = [model(i, layers=3, width=32) for i in range(3)]
    for sd in sds[1:]:
        sd["layers.0.norm.weight"] = sds[0]["layers.0.norm.weight"]  # shared by all
    ids = [raw_store.snapshot(ckpt(sd), step=i) for i, sd in enumerate(sds)]
    hashes = [{e.hash for e in raw_store.entries(i).values()} for i in ids]
    before = blob_files(raw_store.root)
    assert raw_store.gc().blobs_removed == 0 and blob_files(raw_store.root) == before

    raw_store.remove(ids[1])
    only_mid = hashes[1] - hashes[0] - hashes[2]
    assert only_mid
    expect = sum(before[h] for h in only_mid)
    assert raw_store.reclaimable_bytes() == expect
    res = raw_store.gc()
    assert res.blobs_removed == len(only_mid) and res.bytes_freed == expect
    assert set(blob_files(raw_store.root)) == hashes[0] | hashes[2]
    assert res.blobs_kept == len(hashes[0] | hashes[2])
    assert raw_store.verify().ok
    for sid, sd in ((ids[0], sds[0]), (ids[2], sds[2])):
        with raw_store.open_snapshot(sid) as snap:
            for k, v in sd.items():
                assert snap[k].read() == v.tobytes()


def test_gc_removes_orphans_and_stale_temp_files(raw_store, monkeypatch):
    raw_store.snapshot(ckpt({"a": np.zeros(5, np.int32)}))
    keep = set(blob_files(raw_store.root))
    # what a killed writer leaves: a complete but unreferenced blob and a temp file
    h, created = raw_store.blobs.put(ckpt({"o": np.arange(9, dtype=np.int64)})["o"])
    assert created
    tmp = os.path.join(raw_store.root, "tmp", "deadbeef.part")
    with open(tmp, "wb") as f:
        f.write(b"half a blob")
    res = raw_store.gc()
    assert res.blobs_removed == 1 and res.temp_files_removed == 0  # a fresh temp file may be a live writer's
    monkeypatch.setattr(store_mod, "STALE_TEMP_S", 0.0)
    assert raw_store.gc().temp_files_removed == 1
    assert set(blob_files(raw_store.root)) == keep and not os.path.exists(tmp)


def test_gc_keep_last_keeps_tagged(raw_store):
    ids = [raw_store.snapshot(ckpt({"w": np.full(4, i, np.float32)}), step=i, tag="best" if i == 1 else None)
           for i in range(6)]
    res = raw_store.gc(keep_last=2)
    assert res.snapshots_removed == [ids[0], ids[2], ids[3]]
    assert [i.id for i in raw_store.list()] == [ids[1], ids[4], ids[5]]
    assert res.blobs_removed == 3
    assert len(blob_files(raw_store.root)) == 3
    with pytest.raises(CkptError, match="0 or more"):
        raw_store.gc(keep_last=-1)


def test_remove_reparents_and_keeps_the_manifest(raw_store):
    m = Manifest.from_keys(["head.*"])
    a = raw_store.snapshot(ckpt({"head.w": np.zeros(2, np.float32), "body": np.zeros(2, np.float32)}), manifest=m)
    b = raw_store.snapshot(ckpt({"head.w": np.ones(2, np.float32), "body": np.zeros(2, np.float32)}))
    c = raw_store.snapshot(ckpt({"head.w": np.full(2, 2, np.float32), "body": np.ones(2, np.float32)}))
    assert raw_store.effective_manifest(c) == m
    raw_store.remove(a)
    infos = raw_store.list()
    assert [i.id for i in infos] == [b, c]
    assert infos[0].parent is None and infos[0].manifest == m  # pushed down
    assert infos[1].parent == b
    log = raw_store.log()
    assert [(r.changed, r.drift, r.drift_names) for r in log] == [(None, 0, []), (2, 1, ["body"])]
    with pytest.raises(CkptError, match="unknown snapshot ref"):
        raw_store.remove(a)


def test_every_single_byte_flip_is_detected_exhaustively(store):
    """Every byte of a small blob, one at a time: raw, or the compressed frame format."""
    a = (np.random.default_rng(3).standard_normal(250) * 0.05).astype(np.float32)
    store.snapshot(ckpt({"a": a}))
    e = store.entries("latest")["a"]
    path, start, length = store.blobs.locate(e.hash)  # packed: the object's span in its pack
    assert store.blobs.check(e.hash, e.nbytes) is None
    missed = []
    for off in range(start, start + length):
        flip_byte(path, off)  # in place: a pack's mapping sees it
        if store.blobs.check(e.hash, e.nbytes) is None:
            missed.append(off)
        flip_byte(path, off)
    assert missed == [] and length > 500
    assert store.blobs.check(e.hash, e.nbytes) is None
