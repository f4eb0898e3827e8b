"""Pack files: small objects share a pack and an index, big ones stay loose files;
reading, export, verify, gc and older blob-per-file stores all keep working."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest
from safetensors.numpy import load_file
from store_helpers import blob_files, ckpt, flip_byte, object_files

from ckptdiff.errors import CkptError
from ckptdiff.store import Store
from ckptdiff.store import blobs as blobs_mod
from ckptdiff.store import packs as packs_mod
from ckptdiff.store import store as store_mod
from ckptdiff.store.packs import SMALL_OBJECT_BYTES


def _small(seed: int, n: int = 300) -> dict[str, np.ndarray]:
    """Many tiny tensors of mixed dtypes (and one empty), plus one just under the threshold."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        dt = (np.float32, np.float16, np.int64, np.uint8)[i % 4]
        out[f"expert.{i}.w"] = (rng.standard_normal(1 + i % 37) * 100).astype(dt)
    out["empty"] = np.zeros((0, 3), np.float32)
    out["edge"] = np.arange(SMALL_OBJECT_BYTES // 4 - 1, dtype=np.float32)
    return out


def _packs(root: str) -> list[str]:
    return [f for f in object_files(root) if f.startswith("packs/")]


def _loose(root: str) -> list[str]:
    return [f for f in object_files(root) if f.startswith("blobs/")]


def test_small_tensors_share_one_pack_and_big_ones_stay_loose(store, tmp_path):
    arrays = _small(0)
    arrays["big"] = np.arange(SMALL_OBJECT_BYTES // 4, dtype=np.float32)  # exactly the threshold: loose
    sid = store.snapshot(ckpt(arrays))
    assert len(_packs(store.root)) == 2  # one .pack, one .idx
    assert _loose(store.root) == [f"blobs/{store.entries(sid)['big'].hash}"]
    with store.open_snapshot(sid) as snap:
        assert all(snap[k].read() == v.tobytes() for k, v in arrays.items())
    # export is bit-exact, checked with the safetensors library itself
    out = tmp_path / "out.safetensors"
    store.export(sid, out)
    back = load_file(os.fspath(out))
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == v.tobytes()
    assert store.verify().ok


def test_dedupe_is_per_object_across_packs(store):
    arrays = _small(1)
    store.snapshot(ckpt(arrays))
    files = object_files(store.root)
    store.snapshot(ckpt(arrays))  # nothing new: no new pack
    assert object_files(store.root) == files
    arrays["expert.7.w"] = arrays["expert.7.w"] + 1
    store.snapshot(ckpt({**arrays, "renamed": arrays["expert.3.w"]}))
    assert len(_packs(store.root)) == 4  # a second pack, holding only the changed tensor
    newest = [p for p in _packs(store.root) if p not in files and p.endswith(".idx")]
    (name,) = [os.path.basename(p)[:-4] for p in newest]
    assert [r[0] for r in store.blobs.packs.packs[name]] == [store.entries("latest")["expert.7.w"].hash]


def test_compressed_stores_compress_packed_objects(tmp_path):
    arrays = {f"t{i}": np.full(4000, i, np.float32) for i in range(20)}  # 16 KB each, very compressible
    with Store.init(tmp_path / "z", compress=True) as s:
        s.snapshot(ckpt(arrays))
        for e in s.entries("latest").values():
            path, off, length = s.blobs.locate(e.hash)
            assert path.endswith(".pack") and length < e.nbytes // 20
            with open(path, "rb") as f:
                f.seek(off)
                assert f.read(4) == b"CKDZ"  # the compressed blob format, inside the pack
        assert s.disk_usage() < sum(a.nbytes for a in arrays.values()) // 20
        with s.open_snapshot("latest") as snap:
            assert all(snap[k].read() == v.tobytes() for k, v in arrays.items())


def test_every_byte_of_a_pack_and_its_index_is_checked(store):
    """Flip each byte of a small pack, then of its index, one at a time: verify notices every one."""
    arrays = {"a": np.arange(7, dtype=np.float32), "b": np.arange(5, dtype=np.int16), "c": np.ones(3, np.float64)}
    store.snapshot(ckpt(arrays))
    idx_path = os.path.join(store.root, [p for p in _packs(store.root) if p.endswith(".idx")][0])
    pack_path = idx_path[:-4] + ".pack"
    for path in (pack_path, idx_path):
        original = open(path, "rb").read()  # noqa: SIM115
        missed = []
        for off in range(len(original)):
            flip_byte(path, off)
            with Store.open(store.root) as fresh:  # a fresh process's view: nothing mapped or indexed yet
                if fresh.verify().ok:
                    missed.append(off)
            flip_byte(path, off)
        assert missed == [] and len(original) > 60, (os.path.basename(path), missed)
    res = store.verify()
    assert res.ok


def test_a_damaged_index_or_a_missing_pack_is_reported(raw_store):
    raw_store.snapshot(ckpt({"a": np.arange(9, dtype=np.int32)}), tag="x")
    sid = raw_store.resolve("x").id
    idx = os.path.join(raw_store.root, [p for p in _packs(raw_store.root) if p.endswith(".idx")][0])
    flip_byte(idx, 5)
    with Store.open(raw_store.root) as s:
        res = s.verify()
        assert [(b.problem, b.affected) for b in res.bad] == [("missing", [(sid, "a")])]
        assert any("index is unreadable" in e for e in res.errors)
        with s.open_snapshot("x") as snap, pytest.raises(CkptError, match="missing"):
            snap["a"].read()
    flip_byte(idx, 5)
    os.unlink(idx[:-4] + ".pack")
    with Store.open(raw_store.root) as s:
        res = s.verify()
        assert [(b.problem, b.affected) for b in res.bad] == [("missing (its pack file is gone)", [(sid, "a")])]
        with s.open_snapshot("x") as snap, pytest.raises(CkptError, match="missing"):
            snap["a"].read()


def test_gc_repacks_without_unreferenced_objects(store):
    # the middle snapshot's pack holds an object only it uses and one the last snapshot shares
    shared = np.full(20, 7, np.int16)
    ids = [store.snapshot(ckpt({**_small(9, 40), f"own{i}": np.full(50, i, np.int64),
                                **({"shared": shared} if i else {})})) for i in range(3)]
    own = [store.entries(i)[f"own{n}"].hash for n, i in enumerate(ids)]
    store.remove(ids[1])
    freed = store.reclaimable_bytes()
    assert freed == blob_files(store.root)[own[1]] > 0
    packs_before = _packs(store.root)
    res = store.gc()
    assert res.blobs_removed == 1 and res.bytes_freed == freed
    assert own[1] not in blob_files(store.root) and {own[0], own[2]} <= set(blob_files(store.root))
    assert _packs(store.root) != packs_before and len(_packs(store.root)) == len(packs_before)
    assert store.verify().ok and store.verify().unreferenced == 0
    for sid in (ids[0], ids[2]):
        with store.open_snapshot(sid) as snap:
            assert all(len(snap[k].read()) == snap[k].nbytes for k in snap)
    after = _packs(store.root)
    again = store.gc()  # nothing left to do: packs untouched
    assert again.blobs_removed == 0 and _packs(store.root) == after


def test_gc_drops_duplicates_orphans_and_merges_many_packs(raw_store, monkeypatch):
    for i in range(4):
        raw_store.snapshot(ckpt({f"t{i}": np.full(10, i, np.int32), "shared": np.ones(3, np.int8)}))
    # a duplicate: another pack holding an object already stored (two writers raced on it)
    t = ckpt({"dup": np.full(10, 0, np.int32)})["dup"]
    other = blobs_mod.BlobDir(raw_store.root, compressed=False)  # knows no pack yet: writes it again
    w = other.new_pack()
    assert other.put_packed(t, w) and w.objects
    w.publish()
    # an index-less pack: a writer killed between its two renames
    with open(os.path.join(raw_store.root, "packs", "pack-0123456789abcdef01234567.pack"), "wb") as f:
        f.write(packs_mod.pack_header(False) + b"junk")
    assert len(_packs(raw_store.root)) == 4 * 2 + 2 + 1
    monkeypatch.setattr(blobs_mod, "MERGE_PACKS", 2)
    res = raw_store.gc()
    assert res.blobs_removed == 1  # the duplicate
    assert len(_packs(raw_store.root)) == 2  # everything merged into one pack
    assert raw_store.verify().ok
    with raw_store.open_snapshot("latest") as snap:
        assert snap["t3"].read() == np.full(10, 3, np.int32).tobytes()


def test_a_failed_commit_drops_the_pack_it_published(raw_store, monkeypatch):
    raw_store.snapshot(ckpt(_small(2, 20)))
    before = object_files(raw_store.root)

    def fail(*_a, **_k):
        raise CkptError("simulated failure at commit")

    monkeypatch.setattr(Store, "_commit", fail)
    with pytest.raises(CkptError, match="simulated"):
        raw_store.snapshot(ckpt(_small(3, 20)))
    assert object_files(raw_store.root) == before
    assert os.listdir(os.path.join(raw_store.root, "tmp")) == []


@pytest.mark.parametrize("list_loose", [True, False], ids=["one-listing", "stat-each"])
def test_older_blob_per_file_stores_read_and_grow_without_migration(tmp_path, monkeypatch, store, list_loose):
    """A store written before packs existed (every object a loose file, no packs/ folder).

    Dedupe against its loose blobs both ways a snapshot looks for them."""
    monkeypatch.setattr(store_mod, "LIST_LOOSE_MIN", 0 if list_loose else 10**9)
    root = store.root
    arrays = _small(4, 60)
    with monkeypatch.context() as m:  # write exactly the old layout
        m.setattr(store_mod, "SMALL_OBJECT_BYTES", 0)
        old_id = store.snapshot(ckpt(arrays), tag="old")
    assert not os.path.exists(os.path.join(root, "packs"))  # made by the first pack
    with sqlite3.connect(os.path.join(root, "ckptdiff.db")) as c:
        c.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    c.close()
    old_files = object_files(root)
    assert len(old_files) == len({a.tobytes() for a in arrays.values()}) and not _packs(root)
    with Store.open(root) as s:
        assert s.verify().ok
        with s.open_snapshot("old") as snap:
            assert all(snap[k].read() == v.tobytes() for k, v in arrays.items())
        # the same tensors dedupe against the loose files; new small ones go to a pack
        grown = dict(arrays, extra=np.arange(11, dtype=np.float16))
        s.snapshot(ckpt(grown))
        assert _loose(root) == old_files and len(_packs(root)) == 2
        (records,) = s.blobs.packs.packs.values()
        assert [r[0] for r in records] == [s.entries("latest")["extra"].hash]  # nothing stored twice
        # raised to the version that has packs: an older ckptdiff asks to be upgraded rather than misreading
        assert s.conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone() == ("2",)
        assert s.gc().blobs_removed == 0
        assert s.verify().ok
        out = tmp_path / "old.safetensors"
        s.export(old_id, out)
        assert {k: v.tobytes() for k, v in load_file(os.fspath(out)).items()} == \
               {k: v.tobytes() for k, v in arrays.items()}


def test_a_failure_while_publishing_leaves_no_pack_behind(raw_store, monkeypatch):
    """Disk full at the index's rename (the pack itself already renamed): nothing stays in packs/ or tmp/."""
    import errno

    raw_store.snapshot(ckpt(_small(5, 20)))
    before = object_files(raw_store.root)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CkptError, match="disk full"):
        raw_store.snapshot(ckpt(_small(6, 20)))
    monkeypatch.setattr(os, "replace", real)
    assert object_files(raw_store.root) == before
    assert os.listdir(os.path.join(raw_store.root, "tmp")) == []
    assert raw_store.verify().ok and len(raw_store.list()) == 1


def test_the_shipped_sample_history_a_store_from_before_packs(tmp_path):
    """sample_ckpts/history was written by the blob-per-file version (format 1): used as it is."""
    import shutil

    root = os.fspath(tmp_path / "history")
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copytree(os.path.join(here, "..", "..", "sample_ckpts", "history"), root)
    loose = _loose(root)
    assert loose and not _packs(root)
    with Store.open(root) as s:
        assert s.conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone() == ("1",)
        res = s.verify()
        assert res.ok and res.blobs_checked == len(loose)
        last = s.open_snapshot("latest")
        grown = {n: last[n].numpy() for n in last}
        grown["encoder.0.weight"] = grown["encoder.0.weight"] * 2
        sid = s.snapshot(ckpt(grown))
        assert _loose(root) == loose and len(_packs(root)) == 2  # the one changed tensor, packed
        assert s.verify().ok
        with s.open_snapshot(sid) as snap:
            assert all(snap[n].read() == grown[n].tobytes() for n in grown)
