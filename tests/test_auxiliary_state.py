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

SAMPLES = Path(__file__).resolve().parents[1] / "sample_ckpts"


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
