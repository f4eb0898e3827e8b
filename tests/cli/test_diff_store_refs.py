"""`ckptdiff diff` on store snapshots (DIR@REF) and between a snapshot and a file; the progress bar path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff import Checkpoint
from ckptdiff.cli import main
from ckptdiff import diff


@pytest.fixture()
def store_dir(tmp_path):
    from ckptdiff.store import Store
    base = {"enc.w": np.linspace(-1, 1, 64, dtype=np.float32), "head.w": np.zeros(8, np.float32)}
    tuned = {"enc.w": base["enc.w"].copy(), "head.w": np.full(8, 0.5, np.float32)}
    tuned["enc.w"][10] += 1e-3
    root = tmp_path / "store"
    with Store.init(str(root)) as st:
        st.snapshot(Checkpoint.from_arrays(base).tensors, step=0, tag="base")
        st.snapshot(Checkpoint.from_arrays(tuned).tensors, step=1)
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return root


def test_diff_between_snapshots(store_dir, capsys):
    rc = main(["diff", f"{store_dir}@base", f"{store_dir}@latest", "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["old"]["format"] == "store"
    by = {t["name"]: t for t in data["tensors"]}
    assert by["enc.w"]["changed_elements"] == 1
    assert by["enc.w"]["max_abs_delta"] == pytest.approx(1e-3, rel=1e-3)
    assert by["head.w"]["rel_l2"] == "inf"


def test_snapshot_against_the_file_it_came_from_is_identical(store_dir, capsys):
    rc = main(["diff", f"{store_dir}@latest", str(store_dir.parent / "tuned.safetensors"), "-f", "json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["summary"]["identical"] == 2


def test_equal_snapshots_compare_by_hash(store_dir):
    rep = diff(f"{store_dir}@latest", f"{store_dir}@step:1")
    assert [t.status for t in rep.tensors] == ["identical", "identical"]


def test_unknown_ref_exits_2(store_dir, capsys):
    assert main(["diff", f"{store_dir}@nosuchtag", f"{store_dir}@latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptdiff: error: ") and err.count("\n") == 1


def test_progress_bar_path_runs_when_stderr_is_a_terminal(tmp_path, capsys, monkeypatch):
    import ckptdiff.progress as bar
    monkeypatch.setattr(bar, "stderr_is_tty", lambda: True)
    monkeypatch.setattr(bar, "MIN_BYTES", 0)
    save_file({"w": np.zeros(1 << 16, np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"w": np.ones(1 << 16, np.float32)}, str(tmp_path / "b.safetensors"))
    calls = []
    real = bar._Bar.update

    def spy(self, done, total):
        calls.append((done, total))
        real(self, done, total)

    monkeypatch.setattr(bar._Bar, "update", spy)
    rc = main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-f", "json"])
    out = capsys.readouterr().out
    assert rc == 1 and json.loads(out)["summary"]["changed"] == 1
    assert calls[-1] == (1 << 19, 1 << 19)
    calls.clear()
    main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-f", "json", "--no-progress"])
    assert calls == []
