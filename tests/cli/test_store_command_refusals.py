"""The store commands refuse bad requests with one line and exit 2, and a refusal leaves
everything as it was: no half-made store, no overwritten checkpoint, no write into a store's own files."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from ckptdiff import Checkpoint
from ckptdiff.cli import main
from ckptdiff.errors import CkptError
from ckptdiff.store import Store
from cli_helpers import HOSTILE, cli, one_error


def test_init_with_an_empty_name_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for name in ("", " "):
        rc, _, err = cli(capsys, "init", name)
        assert rc == 2 and "the store directory name is empty" in one_error(err)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    with pytest.raises(CkptError, match="empty"):
        Store.open("", create=True)


def test_rm_needs_an_explicit_ref(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    rc, _, err = cli(capsys, "rm", st)
    assert rc == 2 and "name the snapshot to remove as DIR@REF" in one_error(err)
    with Store.open(st) as s:
        assert len(s.list()) == 1
    rc, out, _ = cli(capsys, "rm", f"{st}@latest")
    assert rc == 0 and out.startswith("removed snapshot ")


@pytest.mark.parametrize("tag,why", [
    ("", "cannot be empty"), (" best", "leading or trailing spaces"), ("latest", "reserved"), ("first", "reserved"),
    ("latest~3", "reserved"), ("step:5", "reserved"), ("a@b", "contains '@'"), ("a\tb", "control"),
    ("x" * 201, "limit is 200"),
])
def test_unreachable_tags_are_refused(files, tmp_path, capsys, tag, why):
    st = tmp_path / "st"
    rc, out, err = cli(capsys, "snapshot", files["x"], "--store", st, "--tag", tag)
    assert rc == 2 and out == "" and why in one_error(err)
    assert not st.exists()  # refused before the store was created
    with Store.open(st, create=True) as s, Checkpoint.from_arrays({"w": np.zeros(1)}) as ck:
        with pytest.raises(CkptError, match=re.escape(why)):
            s.snapshot(ck, tag=tag)
        assert s.list() == []


def test_tags_that_work_as_refs(files, tmp_path, capsys):
    st = tmp_path / "st"
    for tag in ("best", "phase1-done", "v1.0", "cafe", "权重"):
        assert cli(capsys, "snapshot", files["x"], "--store", st, "--tag", tag)[0] == 0
        rc, out, _ = cli(capsys, "show", f"{st}@{tag}", "--format", "json")
        assert rc == 0 and json.loads(out)["tag"] == tag


def test_store_api_checks_step_range(tmp_path):
    with Store.open(tmp_path / "st", create=True) as s, Checkpoint.from_arrays({"w": np.zeros(1)}) as ck:
        for bad in (-1, 2**63, 10**30):
            with pytest.raises(CkptError, match="step must be a whole number from 0"):
                s.snapshot(ck, step=bad)
        sid = s.snapshot(ck, step=2**63 - 1)
        assert s.resolve(f"step:{2**63 - 1}").id == sid


def test_metrics_given_twice_or_without_value(files, tmp_path, capsys):
    st = tmp_path / "st"
    for metrics, why in ((["loss=1", "loss=2"], "--metric loss is given twice (1 and 2)"),
                         (["loss="], "--metric loss has no value"),
                         (["=3"], "expects KEY=VALUE")):
        args = [a for m in metrics for a in ("--metric", m)]
        rc, _, err = cli(capsys, "snapshot", files["x"], "--store", st, *args)
        assert rc == 2 and why in one_error(err)
    assert not st.exists()
    rc, _, _ = cli(capsys, "snapshot", files["x"], "--store", st, "--metric", "loss=nan", "--metric", "acc=inf")
    assert rc == 0
    rc, out, _ = cli(capsys, "log", st, "--format", "json")
    assert json.loads(out)["snapshots"][0]["metrics"] == {"loss": "nan", "acc": "inf"}


def test_export_refuses_a_name_promising_another_format(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    for name in ("o.npz", "o.h5", "o.npy"):
        rc, _, err = cli(capsys, "export", f"{st}@latest", tmp_path / name)
        assert rc == 2 and "export writes .safetensors or .pt files" in one_error(err)
        assert not (tmp_path / name).exists()
    rc, _, _ = cli(capsys, "export", f"{st}@latest", tmp_path / "o.npz", "--format", "safetensors")
    assert rc == 0
    rc, out, _ = cli(capsys, "diff", tmp_path / "o.npz", files["x"], "-f", "json")
    assert rc == 0 and json.loads(out)["summary"]["identical"] == 1
    # over an existing file: refused, the file untouched; --force replaces it
    before = (tmp_path / "o.npz").read_bytes()
    rc, _, err = cli(capsys, "export", f"{st}@latest", tmp_path / "o.npz", "--format", "safetensors")
    assert rc == 2 and "already exists (pass --force to overwrite)" in one_error(err)
    assert (tmp_path / "o.npz").read_bytes() == before


def test_output_never_replaces_a_checkpoint(files, tmp_path, capsys):
    before = files["a"].read_bytes()
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-o", files["a"])
    assert rc == 2 and "names one of the inputs (OLD, NEW or --manifest)" in one_error(err)
    man_before = files["man"].read_text()
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-m", files["man"], "-f", "json", "-o", files["man"])
    assert rc == 2 and "names one of the inputs" in one_error(err) and files["man"].read_text() == man_before
    other = tmp_path / "other.bin"
    other.write_bytes(files["x"].read_bytes())
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-f", "json", "-o", other)
    assert rc == 2 and "is an existing safetensors checkpoint; refusing to overwrite it" in one_error(err)
    assert files["a"].read_bytes() == before and other.read_bytes() == files["x"].read_bytes()
    # an earlier report is replaced, as -o promises
    report = tmp_path / "r.json"
    report.write_text("old report")
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-f", "json", "-o", report)
    assert rc == 1 and json.loads(report.read_text())["summary"]["changed"] == len(HOSTILE)


def test_compress_on_an_existing_store_is_noted_not_ignored_silently(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "init", st)[0] == 0
    rc, out, err = cli(capsys, "snapshot", files["x"], "--store", st, "--compress")
    assert rc == 0 and len(out.strip()) == 16
    assert err.startswith("ckptdiff: note: --compress ignored:") and err.count("\n") == 1


def test_verify_reports_damaged_snapshot_metadata_and_tui_refuses_early(files, tmp_path, capsys):
    import sqlite3

    st = tmp_path / "st"
    for step in (1, 2):
        assert cli(capsys, "snapshot", files["x"], "--store", st, "--step", str(step), "--metric", "loss=1",
                   "--manifest", files["man"])[0] == 0
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 0 and out.startswith("ok: ")
    with sqlite3.connect(st / "ckptdiff.db") as c:
        c.execute("UPDATE snapshots SET manifest = '{not json' WHERE step = 1")
        c.execute("UPDATE snapshots SET metrics = '[1, 2' WHERE step = 2")
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].startswith("ERROR snapshot ") and "manifest in the database is damaged" in lines[0]
    assert "metrics in the database are damaged" in lines[1]
    assert lines[-1].startswith("FAILED: ") and "2 other problems" in lines[-1]
    rc, out, _ = cli(capsys, "verify", st, "--format", "json")
    assert rc == 1 and len(json.loads(out)["errors"]) == 2
    rc, out, err = cli(capsys, "log", st)
    assert rc == 2 and "manifest in the store database is damaged" in one_error(err)
    rc, out, err = cli(capsys, "tui", st)  # refused before the screen switches
    assert rc == 2 and "manifest in the store database is damaged" in one_error(err)


def test_hostile_json_inside_a_store_database(files, tmp_path, capsys):
    import sqlite3

    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st, "--manifest", files["man"], "--metric", "a=1")[0] == 0
    deep = "[" * 100_000 + "]" * 100_000
    with sqlite3.connect(st / "ckptdiff.db") as c:
        c.execute("UPDATE snapshots SET manifest = ?, metrics = ?", (deep, deep))
    for args in (["log", st], ["show", f"{st}@latest"], ["diff", f"{st}@latest", files["x"]]):
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and "manifest in the store database is damaged" in one_error(err)
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 1 and "manifest in the database is damaged" in out and "metrics in the database are damaged" in out
    with sqlite3.connect(st / "ckptdiff.db") as c:
        c.execute("UPDATE snapshots SET manifest = NULL")
        c.execute("UPDATE entries SET shape = ?", (deep,))
    rc, _, err = cli(capsys, "show", f"{st}@latest")
    assert rc == 2 and "damaged shape in the store database" in one_error(err)


def test_unwritable_destinations_are_one_line_and_leave_nothing(files, tmp_path, unprivileged):
    """Export, -o, init and snapshot into a read-only directory (root runs without the bypass capabilities)."""
    import subprocess
    import sys

    prefix = unprivileged
    st = tmp_path / "st"
    assert main(["snapshot", os.fspath(files["x"]), "--store", os.fspath(st)]) == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    env.pop("CKPTDIFF_DEBUG", None)
    cases = [
        (["export", f"{st}@latest", f"{ro}/x.safetensors"], "cannot write the export: Permission denied"),
        (["diff", os.fspath(files["x"]), os.fspath(files["x"]), "-o", f"{ro}/r.json"],
         "cannot write the report: directory is not writable"),
        (["init", f"{ro}/new"], "cannot create the store here (Permission denied)"),
        (["snapshot", os.fspath(files["x"]), "--store", f"{ro}/new"], "cannot create the store here"),
    ]
    try:
        for args, why in cases:
            r = subprocess.run([*prefix, sys.executable, "-m", "ckptdiff.cli", *args], capture_output=True,
                               text=True, env=env, timeout=60)
            assert r.returncode == 2 and r.stdout == "", (args, r.stderr)
            assert why in one_error(r.stderr), r.stderr
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_reports_and_exports_never_land_in_a_stores_own_files(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    blob = next((st / "packs").iterdir())  # small tensors: packed
    db_before, blob_before = (st / "ckptdiff.db").read_bytes(), blob.read_bytes()
    for target in (st / "ckptdiff.db", blob, st / "blobs" / "new.json", st / "packs" / "new.json",
                   st / "tmp" / "r.json", st / "gc.lock"):
        rc, _, err = cli(capsys, "diff", files["x"], files["x"], "-f", "json", "-o", target)
        assert rc == 2 and "refusing to write the report there" in one_error(err), target
        rc, _, err = cli(capsys, "export", f"{st}@latest", target, "--force", "--format", "safetensors")
        assert rc == 2 and "is one of the store's own files" in one_error(err), target
    assert (st / "ckptdiff.db").read_bytes() == db_before and blob.read_bytes() == blob_before
    assert not (st / "blobs" / "new.json").exists() and not (st / "tmp" / "r.json").exists()
    assert not (st / "packs" / "new.json").exists()
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 0 and out.startswith("ok: ")
    # beside the store's files is fine
    rc, _, _ = cli(capsys, "export", f"{st}@latest", st / "model.safetensors")
    assert rc == 0


def test_a_snapshot_with_no_tensors(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["empty"], "--store", st)[0] == 0
    rc, out, _ = cli(capsys, "show", f"{st}@latest")
    assert rc == 0 and "tensors   0 (0 B)" in out and out.rstrip().endswith("(no tensors)")
    for name in ("e.safetensors", "e.pt"):
        assert cli(capsys, "export", f"{st}@latest", tmp_path / name)[0] == 0
    rc, out, _ = cli(capsys, "diff", tmp_path / "e.pt", tmp_path / "e.safetensors")
    assert rc == 0 and out.splitlines()[-1] == "PASS: no tensors to compare"
