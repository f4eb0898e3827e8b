"""The store commands end to end: output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from store_helpers import model, same_bits

from ckptdiff.cli import main
from ckptdiff.formats import open_checkpoint


@pytest.fixture
def run_dir(tmp_path):
    """Three checkpoints of a fine-tune: only head.* is trainable; step 2 nudges a frozen layer."""
    sd = model(0, layers=3, width=32)
    files = []
    for step in range(3):
        if step:
            sd = dict(sd, **{"head.weight": sd["head.weight"] + np.float32(0.01), "head.bias": sd["head.bias"] + 1})
        if step == 2:
            sd["layers.0.attn.weight"] = sd["layers.0.attn.weight"] + np.float32(1e-6)
        p = tmp_path / f"step{step}.safetensors"
        save_file(sd, p)
        files.append(os.fspath(p))
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps({"trainable": ["head.*"]}))
    return tmp_path, files, os.fspath(man), sd


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_full_workflow(run_dir, capsys):
    tmp, files, man, last = run_dir
    st = os.fspath(tmp / "store")
    rc, out, err = cli(capsys, "init", st)
    assert rc == 0 and "initialized an empty ckptdiff store" in out
    ids = []
    for step, f in enumerate(files):
        extra = ["--manifest", man, "--tag", "base"] if step == 0 else ["--metric", f"loss={2.0 - step / 2}"]
        rc, out, err = cli(capsys, "snapshot", f, "--store", st, "--step", str(step), *extra)
        assert rc == 0, err
        ids.append(out.strip())
        assert len(ids[-1]) == 16 and int(ids[-1], 16) >= 0

    rc, out, _ = cli(capsys, "log", st)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "STEP", "TAG", "CHANGED", "DRIFT", "METRICS"]
    assert lines[1].split()[0] == ids[0][:12] and lines[1].split()[-3:] == ["base", "root", "0"]
    assert lines[2].split()[-3:] == ["2", "0", "loss=1.5"]
    assert lines[3].split()[-3:] == ["3", "1", "loss=1"]
    assert "3 snapshots" in out

    rc, out, _ = cli(capsys, "log", st, "--format", "json")
    log = json.loads(out)
    assert log["schema"] == "ckptdiff.log/1"
    assert [s["changed_vs_parent"] for s in log["snapshots"]] == [None, 2, 3]
    assert [s["drift_vs_first"] for s in log["snapshots"]] == [0, 0, 1]
    assert log["snapshots"][2]["drifted_tensors"] == ["layers.0.attn.weight"]
    assert log["snapshots"][1]["metrics"] == {"loss": 1.5}

    rc, out, _ = cli(capsys, "show", f"{st}@latest")
    assert rc == 0 and f"snapshot  {ids[2]}" in out and "inherited" in out
    row = next(line for line in out.splitlines() if line.startswith("head.bias"))
    assert row.split() == ["head.bias", "float32", "16", row.split()[3], "trainable"]
    rc, out, _ = cli(capsys, "show", f"{st}@base", "--format", "json")
    shown = json.loads(out)
    assert shown["schema"] == "ckptdiff.snapshot/1" and shown["id"] == ids[0] and shown["tag"] == "base"
    roles = {t["name"]: t["role"] for t in shown["tensors"]}
    assert roles["head.weight"] == "trainable" and roles["layers.2.norm.weight"] == "frozen"

    out_file = tmp / "back.safetensors"
    rc, _, err = cli(capsys, "export", f"{st}@{ids[2][:7]}", os.fspath(out_file))
    assert rc == 0 and "exported snapshot" in err
    with open_checkpoint(os.fspath(out_file)) as c:
        for k, v in last.items():
            assert same_bits(c[k].numpy(), v)
    rc, _, err = cli(capsys, "export", f"{st}@latest", os.fspath(out_file))
    assert rc == 2 and "already exists" in err
    rc, _, err = cli(capsys, "export", f"{st}@latest", os.fspath(out_file), "--force")
    assert rc == 0

    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 0 and out.startswith("ok: re-hashed")
    rc, out, _ = cli(capsys, "verify", st, "--format", "json")
    assert rc == 0 and json.loads(out)["ok"] is True

    rc, out, _ = cli(capsys, "rm", f"{st}@step:1")
    assert rc == 0 and f"removed snapshot {ids[1]} (step 1)" in out and "would free" in out
    rc, out, _ = cli(capsys, "gc", st)
    assert rc == 0 and "freed" in out and "(2 blobs" in out
    rc, out, _ = cli(capsys, "gc", st, "--keep-last", "0")
    assert rc == 0 and "removed 1 snapshots" in out  # the tagged base stays
    rc, out, _ = cli(capsys, "log", st, "--format", "json")
    assert [s["id"] for s in json.loads(out)["snapshots"]] == [ids[0]]


def test_diff_between_snapshots_and_files(run_dir, capsys):
    tmp, files, man, _ = run_dir
    st = os.fspath(tmp / "store")
    for step, f in enumerate(files):
        assert main(["snapshot", f, "--store", st, "--step", str(step)] +
                    (["--manifest", man] if step == 0 else [])) == 0
    capsys.readouterr()
    rc, out, _ = cli(capsys, "diff", f"{st}@first", f"{st}@latest", "--format", "json")
    rep = json.loads(out)
    assert rc == 1  # a frozen tensor drifted
    assert rep["summary"]["drifted"] == 1 and rep["summary"]["changed"] == 3
    drifted = [t for t in rep["tensors"] if t["drift"]]
    assert [t["name"] for t in drifted] == ["layers.0.attn.weight"]
    # a snapshot and the very file it came from are identical by hash
    rc, out, _ = cli(capsys, "diff", f"{st}@latest", files[2], "--format", "json")
    rep = json.loads(out)
    assert rc == 0 and rep["summary"]["identical"] == rep["summary"]["total"]
    hashes = {t["name"]: (t["hash_old"], t["hash_new"]) for t in rep["tensors"]}
    assert all(a == b for a, b in hashes.values() if a is not None)


@pytest.mark.parametrize("args,match", [
    (["log", "{tmp}/nope"], "no such store"),
    (["show", "{tmp}/st@nope"], "unknown snapshot ref 'nope'"),
    (["show", "{tmp}/nostore@latest"], "no such store"),
    (["show", "{tmp}/m.safetensors"], "expected DIR@REF"),
    (["export", "{tmp}/st@latest", "{tmp}/missing/x.safetensors"], "folder to export into does not exist"),
    (["snapshot", "{tmp}/missing.safetensors", "--store", "{tmp}/st"], "no such file"),
    (["snapshot", "{tmp}/m.safetensors", "--store", "{tmp}/st", "--metric", "oops"], "KEY=VALUE"),
    (["snapshot", "{tmp}/m.safetensors", "--store", "{tmp}/st", "--manifest", "{tmp}/nope.json"], "manifest file not found"),
    (["snapshot", "{tmp}/m.safetensors", "--store", "{tmp}/full"], "not empty"),
    (["init", "{tmp}/st"], "already a ckptdiff store"),
    (["gc", "{tmp}/st", "--keep-last", "-1"], "0 or more"),
    (["rm", "{tmp}/st@latest~5"], "only 1 snapshot"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, args, match):
    save_file({"w": np.zeros(3, np.float32)}, tmp_path / "m.safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["snapshot", os.fspath(tmp_path / "m.safetensors"), "--store", os.fspath(tmp_path / "st")]) == 0
    capsys.readouterr()
    rc, out, err = cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("ckptdiff: error: "), err
    assert match in err and "Traceback" not in err


def test_snapshot_creates_store_and_reads_embedded_step(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    p = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.arange(6, dtype=torch.bfloat16)}, "step": 42,
                "trainable_keys": ["w"]}, p)
    st = tmp_path / "new-store"
    rc, out, err = cli(capsys, "snapshot", os.fspath(p), "--store", os.fspath(st), "--compress")
    assert rc == 0, err
    rc, out, _ = cli(capsys, "show", f"{st}@latest", "--format", "json")
    shown = json.loads(out)
    assert shown["step"] == 42 and shown["manifest"]["trainable"] == ["w"]
    from ckptdiff.store import Store
    with Store.open(st) as s:
        assert s.compressed
    rc, _, _ = cli(capsys, "export", f"{st}@latest", os.fspath(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], torch.arange(6, dtype=torch.bfloat16))


def test_help_teaches_and_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ckptdiff.cli", "snapshot", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0 and "examples:" in r.stdout and "--metric K=V" in r.stdout and "exit codes:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ckptdiff.cli", "log", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "frozen tensors" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ckptdiff.cli", "verify", os.fspath(tmp_path)], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 2 and "not a ckptdiff store" in r.stderr


def test_snapshot_from_one_store_into_another(run_dir, capsys):
    tmp, files, man, last = run_dir
    a, b = os.fspath(tmp / "a"), os.fspath(tmp / "b")
    assert main(["snapshot", files[2], "--store", a, "--step", "7", "--manifest", man]) == 0
    assert main(["snapshot", f"{a}@latest", "--store", b, "--compress"]) == 0
    capsys.readouterr()
    from ckptdiff.store import Store
    with Store.open(a) as sa, Store.open(b) as sb:
        assert sb.compressed and not sa.compressed
        assert {n: e.hash for n, e in sa.entries("latest").items()} == \
            {n: e.hash for n, e in sb.entries("latest").items()}
        assert sb.resolve("latest").source == f"{a}@{sa.resolve('latest').id}"
        with sb.open_snapshot("latest") as snap:
            assert all(same_bits(snap[k].numpy(), v) for k, v in last.items())


def test_log_keeps_one_line_per_snapshot_whatever_the_per_tensor_metrics(tmp_path, capsys, monkeypatch):
    """A drift snapshot of a 61-layer model records 61 drift_max_abs/<tensor> metrics: log folds them
    into one maximum, and on a terminal cuts every row to its width."""
    from ckptdiff.checkpoint import Checkpoint
    from ckptdiff.commands import store_cmds
    from ckptdiff.store import Store

    arrays = {f"layers.{i}.weight": np.full(4, i, np.float32) for i in range(61)}
    per_tensor = {f"drift_max_abs/layers.{i}.weight": 1e-4 * (i + 1) for i in range(61)}
    st = tmp_path / "st"
    with Store.open(st, create=True) as s:
        ids = [s.snapshot(Checkpoint.from_arrays(arrays).tensors, step=0, metrics={"loss": 1.5}),
               s.snapshot(Checkpoint.from_arrays(arrays).tensors, step=1, tag="drift", metrics=per_tensor),
               s.snapshot(Checkpoint.from_arrays(arrays).tensors, step=2, metrics={"loss": 1.25, **per_tensor})]
    rc, out, _ = cli(capsys, "log", os.fspath(st))  # not a terminal: nothing is cut
    rows = out.splitlines()[1:4]
    assert rc == 0 and "drift_max_abs/" not in out
    assert rows[0].endswith("loss=1.5")
    assert rows[1].endswith("  drift_max_abs=0.0061 (max of 61 tensors)")
    assert rows[2].endswith("  loss=1.25 drift_max_abs=0.0061 (max of 61 tensors)")
    rc, out, _ = cli(capsys, "show", f"{st}@drift")  # the detail stays where one snapshot is shown
    assert "drift_max_abs/layers.60.weight=0.0061" in out
    monkeypatch.setattr(store_cmds, "_terminal_width", lambda: 60)
    rc, out, _ = cli(capsys, "log", os.fspath(st))
    rows = out.splitlines()[1:4]
    assert rc == 0 and all(len(r) == 60 and r.endswith("…") for r in rows[1:]), rows
    assert [r.split()[0] for r in rows] == [i[:12] for i in ids]  # cut at the end: ids stay whole
