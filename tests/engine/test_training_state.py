"""Training state beside the model in a .pt (optimizer moments, step counters) is not frozen weights.

A user manifest that lists only ``trainable`` makes every other tensor frozen;
without the reader telling the engine which top-level entries are training
state, a clean fine-tune saved with its optimizer would report every Adam
moment as frozen-layer drift.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import ckptdiff  # noqa: E402
from ckptdiff.manifest import Manifest  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "sample_ckpts"


def _manifest(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(data))
    return p


def test_optimizer_state_is_not_drift_under_a_trainable_only_manifest(tmp_path):
    m = _manifest(tmp_path, {"trainable": ["head.*"]})
    report = ckptdiff.diff(SAMPLES / "base.pt", SAMPLES / "finetune_clean.pt", manifest=m)
    opt = [t for t in report.tensors if t.name.startswith("optimizer.")]
    assert len(opt) == 24 and {t.role for t in opt} == {"buffer"}
    assert report.drifted == [] and not report.failed
    # The model's own frozen tensors are still frozen and still checked.
    assert next(t for t in report.tensors if t.name == "backbone.0.weight").role == "frozen"


def test_drift_in_the_model_is_still_found_next_to_optimizer_state(tmp_path):
    m = _manifest(tmp_path, {"trainable": ["head.*"]})
    report = ckptdiff.diff(SAMPLES / "base.pt", SAMPLES / "finetune_drifted.pt", manifest=m)
    drifted = sorted(t.name for t in report.drifted)
    assert drifted == sorted([
        "backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
        "backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked",
        "backbone.3.weight", "backbone.3.bias"])


def test_a_manifest_that_names_the_optimizer_frozen_wins(tmp_path):
    m = _manifest(tmp_path, {"trainable": ["head.*"], "frozen": ["optimizer.*"]})
    report = ckptdiff.diff(SAMPLES / "base.pt", SAMPLES / "finetune_clean.pt", manifest=m)
    assert {t.role for t in report.tensors if t.name.startswith("optimizer.")} == {"frozen"}
    assert len(report.drifted) == 24


def test_nested_model_without_a_wrapper_is_not_set_aside(tmp_path):
    # No state_dict/model entry and no top-level tensors: the nested dicts ARE the model.
    base = {"encoder": {"w": torch.zeros(3)}, "decoder": {"w": torch.zeros(2)}}
    moved = {"encoder": {"w": torch.tensor([0.0, 1e-3, 0.0])}, "decoder": {"w": torch.zeros(2)}}
    torch.save(base, tmp_path / "a.pt")
    torch.save(moved, tmp_path / "b.pt")
    with ckptdiff.open_checkpoint(tmp_path / "b.pt") as ck:
        assert ck.auxiliary == ()
    report = ckptdiff.diff(tmp_path / "a.pt", tmp_path / "b.pt", manifest=Manifest.from_keys(["decoder.*"]))
    assert [t.name for t in report.drifted] == ["encoder.w"]
    assert report.drifted[0].max_abs_delta == pytest.approx(1e-3)


def test_with_buffers_keeps_explicit_patterns_first():
    m = Manifest.from_dict({"trainable": ["head.*"], "frozen": ["optimizer.state.0.*"]})
    m2 = m.with_buffers(["optimizer", "optimizer.*"])
    assert m2.role("optimizer.state.1.exp_avg") == "buffer"
    assert m2.role("optimizer.state.0.exp_avg") == "frozen"  # the user's more specific glob
    assert m2.role("backbone.w") == "unknown"  # frozen listed: unlisted names stay unknown
    assert m.with_buffers([]) is m


# ---------------------------------------------------------------------------
# snapshots remember it
# ---------------------------------------------------------------------------

def _snapshot_pair(tmp_path: Path):  # noqa: ANN202
    from ckptdiff.store import Store

    store = Store.init(tmp_path / "runs")
    with store, ckptdiff.open_checkpoint(SAMPLES / "base.pt") as a, \
            ckptdiff.open_checkpoint(SAMPLES / "finetune_clean.pt") as b:
        assert a.auxiliary == ("optimizer",)
        s1 = store.snapshot(a, step=0)
        s2 = store.snapshot(b, step=1)
    return tmp_path / "runs", s1, s2


def test_snapshots_of_training_checkpoints_keep_optimizer_state_out_of_drift(tmp_path):
    root, s1, s2 = _snapshot_pair(tmp_path)
    from ckptdiff.store import Store

    with Store.open(root) as st:
        assert st.resolve(s2).auxiliary == ("optimizer",)
        assert st.resolve(s2).to_dict()["auxiliary"] == ["optimizer"]
        with st.open_snapshot(s2) as ck:
            assert ck.auxiliary == ("optimizer",)
    m = _manifest(tmp_path, {"trainable": ["head.*"]})
    report = ckptdiff.diff(f"{root}@{s1}", f"{root}@{s2}", manifest=m)
    opt = [t for t in report.tensors if t.name.startswith("optimizer.")]
    assert len(opt) == 24 and {t.role for t in opt} == {"buffer"}
    assert sum(t.status == "changed" for t in opt) > 0  # the moments did move
    assert report.drifted == [] and not report.failed
    # the same answer as diffing the original files
    direct = ckptdiff.diff(SAMPLES / "base.pt", SAMPLES / "finetune_clean.pt", manifest=m)
    assert [(t.name, t.status, t.role) for t in report.tensors] == [(t.name, t.status, t.role) for t in direct.tensors]


def test_show_reports_training_state_roles(tmp_path, capsys):
    from ckptdiff.cli import main

    root, _s1, s2 = _snapshot_pair(tmp_path)
    m = _manifest(tmp_path, {"trainable": ["head.*"]})
    assert main(["snapshot", str(SAMPLES / "finetune_clean.pt"), "--store", str(root), "--manifest", str(m)]) == 0
    capsys.readouterr()
    assert main(["show", f"{root}@latest", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["auxiliary"] == ["optimizer"]
    roles = {t["name"]: t["role"] for t in d["tensors"]}
    assert roles["optimizer.state.0.exp_avg"] == "buffer" and roles["backbone.0.weight"] == "frozen"
    assert main(["show", f"{root}@latest"]) == 0
    assert "training  optimizer (state beside the model" in capsys.readouterr().out


def test_a_store_made_before_the_auxiliary_column_reads_and_upgrades(tmp_path):
    import sqlite3

    from ckptdiff.store import Store

    root, s1, _s2 = _snapshot_pair(tmp_path)
    db = root / "ckptdiff.db"
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE snapshots DROP COLUMN auxiliary")  # what an older ckptdiff wrote
    con.commit()
    con.close()
    with Store.open(root) as st:  # reading never migrates: the column is read as NULL
        assert [i.auxiliary for i in st.list()] == [(), ()]
        with st.open_snapshot(s1) as ck:
            assert ck.auxiliary == ()
    con = sqlite3.connect(db)
    assert "auxiliary" not in [r[1] for r in con.execute("PRAGMA table_info(snapshots)")]
    con.close()
    with Store.open(root) as st, ckptdiff.open_checkpoint(SAMPLES / "finetune_drifted.pt") as c:
        s3 = st.snapshot(c, step=2)  # the writer adds the column in its transaction
        assert st.resolve(s3).auxiliary == ("optimizer",)
        assert st.resolve(s1).auxiliary == ()


def test_log_and_the_tui_history_do_not_count_optimizer_state_as_drift(tmp_path):
    from ckptdiff.store import Store
    from ckptdiff.store.history import roles_manifest

    root = tmp_path / "runs"
    m = Manifest.load(_manifest(tmp_path, {"trainable": ["head.*"]}))
    with Store.init(root) as st, ckptdiff.open_checkpoint(SAMPLES / "base.pt") as a, \
            ckptdiff.open_checkpoint(SAMPLES / "finetune_clean.pt") as b, \
            ckptdiff.open_checkpoint(SAMPLES / "finetune_drifted.pt") as c:
        st.snapshot(a, step=0, manifest=m)
        st.snapshot(b, step=1)
        st.snapshot(c, step=2)
        infos = st.list()
        man = roles_manifest(infos[1].id, {i.id: i for i in infos})
        assert man is not None and man.role("optimizer.state.0.exp_avg") == "buffer"
        assert man.role("backbone.0.weight") == "frozen"
        log = st.log()
    # clean fine-tune: nothing drifted although 24 optimizer tensors moved; drifted run: the 9 model tensors
    assert [row.drift for row in log] == [0, 0, 9]


def test_the_recorded_manifest_stays_the_users_own(tmp_path):
    """Training state is applied where roles are decided, not written into the manifest:
    an opened snapshot, `show`'s effective manifest and an export carry the user's patterns only."""
    from ckptdiff.store import Store

    root = tmp_path / "runs"
    m = Manifest.load(_manifest(tmp_path, {"trainable": ["head.*"]}))
    with Store.init(root) as st, ckptdiff.open_checkpoint(SAMPLES / "finetune_clean.pt") as b:
        sid = st.snapshot(b, manifest=m)
        with st.open_snapshot(sid) as ck:
            assert ck.manifest is not None and ck.manifest.buffers == ()
            assert ck.auxiliary == ("optimizer",)
        assert st.effective_manifest(sid).to_dict() == {"trainable": ["head.*"], "frozen": []}
        out = tmp_path / "x.safetensors"
        st.export(sid, out)
    with ckptdiff.open_checkpoint(out) as x:
        assert json.loads(x.metadata["ckptdiff.manifest"]) == {"trainable": ["head.*"], "frozen": []}
