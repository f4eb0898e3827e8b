"""Bad situations give one clear CkptError and leave the store as it was:
disk full, a read-only store, a newer format, a damaged or hostile database."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from store_helpers import blob_files, ckpt, model

from ckptdiff.errors import CkptError
from ckptdiff.store import Store, blobs as blobs_mod, db as db_mod


def _state(root: str) -> tuple[dict[str, int], list[str], list[str]]:
    with Store.open(root) as s:
        ids = [i.id for i in s.list()]
    return blob_files(root), ids, sorted(os.listdir(os.path.join(root, "tmp")))


def _store_then_full_disk(tmp_path, monkeypatch, fails):  # noqa: ANN001, ANN202
    """A store holding one snapshot, and blob writes that fail with ENOSPC where
    ``fails(call_number)`` says so. Returns the root, its state, the call counter
    and the real writer."""
    root = os.fspath(tmp_path / "st")
    with Store.init(root) as s:
        s.snapshot(ckpt(model(0)))
    before = _state(root)
    real = blobs_mod._write_all
    calls = {"n": 0}

    def full_disk(fd, data):
        calls["n"] += 1
        if fails(calls["n"]):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(blobs_mod, "_write_all", full_disk)
    return root, before, calls, real


def test_disk_full_midway_leaves_store_unchanged(tmp_path, monkeypatch):
    root, before, calls, real = _store_then_full_disk(tmp_path, monkeypatch, lambda n: n == 4)
    with Store.open(root) as s:
        with pytest.raises(CkptError, match="disk full while writing a snapshot; the store was left unchanged"):
            s.snapshot(ckpt(model(1)))  # all-new bytes: several blobs written before the failure
    assert calls["n"] == 4
    assert _state(root) == before  # no new blobs, no temp files, no snapshot
    monkeypatch.setattr(blobs_mod, "_write_all", real)
    with Store.open(root) as s:
        assert s.verify().ok
        s.snapshot(ckpt(model(1)))  # and the store still works
        assert len(s.list()) == 2


def test_disk_full_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    from safetensors.numpy import save_file

    from ckptdiff.cli import main

    f = tmp_path / "m.safetensors"
    save_file(model(3), f)
    root = os.fspath(tmp_path / "st")
    Store.init(root).close()

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobs_mod, "_write_all", full_disk)
    assert main(["snapshot", os.fspath(f), "--store", root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ckptdiff: error: {root}: disk full while writing a snapshot; the store was left unchanged"]


def _snapshot_file(dirpath: str) -> str:
    from safetensors.numpy import save_file

    p = os.path.join(dirpath, "m.safetensors")
    save_file({"w": np.arange(64, dtype=np.float32)}, p)
    os.chmod(p, 0o644)
    return p


def _chmod_tree(root: str, dirs: int, files: int) -> None:
    for d, subdirs, names in os.walk(root):
        os.chmod(d, dirs)
        for n in names:
            os.chmod(os.path.join(d, n), files)


def test_read_only_store(tmp_path, unprivileged):
    """chmod a-w: writes fail with one clear line, reads still work, nothing changes.

    Root ignores file modes, so as root the commands run with the capabilities
    that bypass them (dac_override, dac_read_search, fowner) dropped.
    """
    prefix = unprivileged
    base = os.fspath(tmp_path)
    root = os.path.join(base, "st")
    src = _snapshot_file(base)
    with Store.init(root) as s:
        s.snapshot(ckpt({"a": np.ones(8, np.float32)}), tag="one")
    before = _tree(root)
    _chmod_tree(root, 0o555, 0o444)
    env = dict(os.environ, PYTHONPATH=os.getcwd())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, sys.executable, "-m", "ckptdiff.cli", *args], capture_output=True,
                              text=True, env=env, cwd=base, timeout=60)

    try:
        r = cli("snapshot", src, "--store", root)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            f"ckptdiff: error: {root}: store is read-only; cannot write a snapshot"]
        for args in (("rm", f"{root}@one"), ("gc", root), ("gc", root, "--keep-last", "0")):
            r = cli(*args)
            assert r.returncode == 2 and "read-only" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        r = cli("log", root)
        assert r.returncode == 0 and " one " in r.stdout, r.stderr
        r = cli("verify", root)
        assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr
        r = cli("export", f"{root}@one", os.path.join(base, "out.safetensors"))
        assert r.returncode == 0, r.stderr
    finally:
        _chmod_tree(root, 0o755, 0o644)
    assert _tree(root) == before


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if not n.endswith(("-wal", "-shm")):
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_newer_format_version_is_refused(tmp_path, capsys):
    from ckptdiff.cli import main

    root = os.fspath(tmp_path / "st")
    Store.init(root).close()
    with sqlite3.connect(os.path.join(root, db_mod.DB_NAME)) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(db_mod.FORMAT_VERSION + 1),))
    with pytest.raises(CkptError, match=r"store format version 2 was written by a newer ckptdiff.*Upgrade ckptdiff"):
        Store.open(root)
    assert main(["log", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "newer ckptdiff" in err


def test_not_a_store_and_damaged_database(tmp_path):
    with pytest.raises(CkptError, match="no such store"):
        Store.open(tmp_path / "missing")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CkptError, match="not a ckptdiff store"):
        Store.open(tmp_path / "full")
    with pytest.raises(CkptError, match="not empty and is not a ckptdiff store"):
        Store.init(tmp_path / "full")
    with pytest.raises(CkptError, match="not empty"):
        Store.open(tmp_path / "full", create=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CkptError, match="not a directory"):
        Store.init(tmp_path / "afile")
    Store.init(tmp_path / "ok").close()
    with pytest.raises(CkptError, match="already a ckptdiff store"):
        Store.init(tmp_path / "ok")
    Store.open(tmp_path / "new", create=True).close()
    assert (tmp_path / "new" / "ckptdiff.db").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckptdiff.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CkptError, match="not a ckptdiff store|damaged|cannot open"):
        Store.open(bad)


@pytest.mark.parametrize("column,value,match", [
    ("hash", "../../../etc/passwd", "invalid hash"),
    ("dtype", "object", "unknown dtype"),
    ("shape", "[1000000000, 1000000000, 1000000000]", "absurdly large"),
    ("shape", "{\"a\": 1}", "damaged shape"),
    ("nbytes", "12345", "does not match"),
])
def test_hostile_entries_are_refused_not_followed(tmp_path, column, value, match):
    root = os.fspath(tmp_path / "st")
    with Store.init(root) as s:
        s.snapshot(ckpt({"w": np.zeros(4, np.float32)}))
    with sqlite3.connect(os.path.join(root, db_mod.DB_NAME)) as c:
        c.execute(f"UPDATE entries SET {column} = ?", (int(value) if column == "nbytes" else value,))
    with Store.open(root) as s:
        with pytest.raises(CkptError, match=match):
            s.open_snapshot("latest")
        res = s.verify()
        assert not res.ok and any(match.split()[0] in e for e in res.errors)


def test_damaged_manifest_and_metrics_json(tmp_path):
    root = os.fspath(tmp_path / "st")
    with Store.init(root) as s:
        s.snapshot(ckpt({"w": np.zeros(4, np.float32)}))
    with sqlite3.connect(os.path.join(root, db_mod.DB_NAME)) as c:
        c.execute("UPDATE snapshots SET manifest = '[1', metrics = 'nope'")
    with Store.open(root) as s, pytest.raises(CkptError, match="manifest .* damaged"):
        s.list()


def test_damaged_auxiliary_reads_as_none_and_verify_names_it(tmp_path):
    root = os.fspath(tmp_path / "st")
    with Store.init(root) as s:
        s.snapshot(ckpt({"w": np.zeros(4, np.float32)}), auxiliary=["optimizer"])
        s.snapshot(ckpt({"w": np.ones(4, np.float32)}))
        assert [i.auxiliary for i in s.list()] == [("optimizer",), ()]
        assert s.verify().ok
    with sqlite3.connect(os.path.join(root, db_mod.DB_NAME)) as c:
        c.execute("UPDATE snapshots SET auxiliary = '{\"x\": 1' WHERE seq = 1")
    with Store.open(root) as s:
        assert [i.auxiliary for i in s.list()] == [(), ()]  # still listed, read as none
        res = s.verify()
        assert not res.ok and len(res.errors) == 1 and "auxiliary" in res.errors[0]


def test_sqlite_busy_gives_a_clear_error(tmp_path, monkeypatch):
    root = os.fspath(tmp_path / "st")
    Store.init(root).close()
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_S", 0.2)
    blocker = sqlite3.connect(os.path.join(root, db_mod.DB_NAME), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with Store.open(root) as s:
            with pytest.raises(CkptError, match="store is busy"):
                s.snapshot(ckpt({"w": np.zeros(4, np.float32)}))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with Store.open(root) as s:
        # nothing listed; the blob written before the commit was refused is garbage gc frees
        assert s.list() == [] and s.verify().ok
        assert s.reclaimable_bytes() == 16 and s.gc().bytes_freed == 16


def test_disk_full_in_the_parallel_writer(tmp_path, monkeypatch):
    """The same guarantee when blobs are written by the thread pool."""

    monkeypatch.setattr(blobs_mod, "PARALLEL_MIN_BYTES", 0)
    root, before, _calls, _real = _store_then_full_disk(tmp_path, monkeypatch, lambda n: n >= 6)
    with Store.open(root) as s, pytest.raises(CkptError, match="disk full"):
        s.snapshot(ckpt(model(1)))
    assert _state(root) == before


def test_a_name_with_a_lone_surrogate_is_refused_before_anything_is_written(tmp_path):
    """A safetensors header may spell "\\ud800" as a JSON escape; SQLite keeps UTF-8 only."""
    import json
    import struct

    from ckptdiff.formats import open_checkpoint

    header = json.dumps({"bad\ud800name": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    f = tmp_path / "sur.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    store = Store.init(tmp_path / "s")
    with store:
        with pytest.raises(CkptError, match="not valid Unicode"):  # the reader refuses it, as safetensors does
            open_checkpoint(str(f))
        with pytest.raises(CkptError, match=r"tensor name bad\\ud800name is not valid Unicode"), \
                ckpt({"bad\ud800name": np.zeros(2, np.float32)}) as c:  # names from elsewhere: the store's check
            store.snapshot(c)
        with pytest.raises(CkptError, match="tag, message or source"):
            store.snapshot(ckpt({"w": np.zeros(2, np.float32)}), message="m\udc80")
        assert store.list() == [] and blob_files(store.root) == {}
    for target in (tmp_path / "s", tmp_path / "new"):  # an existing store, and one the CLI would create
        p = subprocess.run([sys.executable, "-c", "import sys; from ckptdiff.cli import main; "
                            "sys.exit(main(['snapshot', sys.argv[1], '--store', sys.argv[2]]))",
                            str(f), str(target)], capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not valid Unicode" in p.stderr
    assert not (tmp_path / "new").exists()  # no empty store left behind
