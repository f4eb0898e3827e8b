"""The committed samples under sample_ckpts/: they show what they claim (a
clean fine-tune and a drifted one), agree across formats, and the generator
reproduces them byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ckptdiff.formats import open_checkpoint
from ckptdiff.manifest import Manifest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLES = os.path.join(ROOT, "sample_ckpts")
STEMS = ("base", "finetune_clean", "finetune_drifted")
EXTS = ("safetensors", "pt", "h5", "npz")
FILES = [f"{s}.{e}" for s in STEMS for e in EXTS] + ["manifest.json"]


def _arrays(path: str, only: set[str] | None = None) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as ck:
        return {n: ck[n].numpy().copy() for n in ck if only is None or n in only}


def test_samples_exist_and_are_small():
    sizes = {f: os.path.getsize(os.path.join(SAMPLES, f)) for f in FILES}
    assert sum(sizes.values()) < 5 * 1024 * 1024, sizes


def test_manifest_marks_the_head_trainable():
    m = Manifest.load(os.path.join(SAMPLES, "manifest.json"))
    assert m.role("head.weight") == "trainable"
    assert m.role("backbone.0.weight") == "frozen"
    assert m.role("backbone.1.running_mean") == "frozen"
    assert m.role("optimizer.state.0.exp_avg") == "buffer"


@pytest.mark.parametrize("stem", STEMS)
def test_every_format_holds_the_same_model_tensors(stem):
    ref = _arrays(os.path.join(SAMPLES, f"{stem}.safetensors"))
    assert "backbone.1.running_mean" in ref and "head.weight" in ref
    for ext in ("pt", "h5", "npz"):
        got = _arrays(os.path.join(SAMPLES, f"{stem}.{ext}"), set(ref))
        assert sorted(got) == sorted(ref), ext
        for n in ref:
            assert got[n].dtype == ref[n].dtype, (ext, n)
            assert got[n].shape == ref[n].shape, (ext, n)
            assert got[n].tobytes() == ref[n].tobytes(), (ext, n)
    assert ref["backbone.1.num_batches_tracked"].shape == ()


def test_pt_samples_are_nested_training_checkpoints():
    with open_checkpoint(os.path.join(SAMPLES, "finetune_drifted.pt")) as ck:
        assert ck.metadata["epoch"] == 4
        assert ck.manifest is not None and set(ck.manifest.trainable) == {"head.weight", "head.bias"}
        assert ck.manifest.role("optimizer.state.0.exp_avg") == "buffer"
        assert ck.manifest.role("backbone.0.weight") == "frozen"
        # AdamW was (wrongly) given every parameter: it holds state for the backbone too
        assert "optimizer.state.0.exp_avg" in ck and "optimizer.state.5.exp_avg_sq" in ck
    with open_checkpoint(os.path.join(SAMPLES, "finetune_clean.pt")) as ck:
        assert set(ck.manifest.trainable) == {"head.weight", "head.bias"}
        opt = sorted(n for n in ck if n.startswith("optimizer.state."))
        assert {n.split(".")[2] for n in opt} == {"0", "1"}  # only the head's two params


def test_clean_finetune_moved_only_trainable_tensors():
    manifest = Manifest.load(os.path.join(SAMPLES, "manifest.json"))
    base = _arrays(os.path.join(SAMPLES, "base.safetensors"))
    clean = _arrays(os.path.join(SAMPLES, "finetune_clean.safetensors"))
    assert sorted(base) == sorted(clean)
    for n in base:
        same = np.array_equal(base[n], clean[n])
        if manifest.role(n) == "frozen":
            assert same, f"clean fine-tune changed frozen {n}"
        else:
            assert not same, f"clean fine-tune left trainable {n} untouched"


def test_drifted_finetune_moved_frozen_tensors_by_small_amounts():
    manifest = Manifest.load(os.path.join(SAMPLES, "manifest.json"))
    base = _arrays(os.path.join(SAMPLES, "base.safetensors"))
    drifted = _arrays(os.path.join(SAMPLES, "finetune_drifted.safetensors"))
    frozen = [n for n in base if manifest.role(n) == "frozen"]
    moved = [n for n in frozen if not np.array_equal(base[n], drifted[n])]
    # every frozen weight moved (AdamW decay) and the BatchNorm running stats moved (train mode)
    assert set(moved) == set(frozen)
    for n in ("backbone.0.weight", "backbone.3.weight", "backbone.1.weight"):
        old, new = base[n].astype(np.float64), drifted[n].astype(np.float64)
        rel = np.linalg.norm(new - old) / np.linalg.norm(old)
        assert 1e-4 < rel < 1e-2, (n, rel)  # small: weight decay, not training
        # decay shrinks weights towards zero, it never trains them
        assert np.linalg.norm(new) < np.linalg.norm(old)
    bn_mean_old = base["backbone.1.running_mean"].astype(np.float64)
    bn_mean_new = drifted["backbone.1.running_mean"].astype(np.float64)
    assert np.abs(bn_mean_new - bn_mean_old).max() > 0.1
    assert int(drifted["backbone.1.num_batches_tracked"]) > int(base["backbone.1.num_batches_tracked"])


def test_generator_reproduces_the_committed_bytes(tmp_path):
    out = tmp_path / "regen"
    subprocess.run([sys.executable, os.path.join(SAMPLES, "make_samples.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    for f in FILES:
        with open(os.path.join(SAMPLES, f), "rb") as a, open(out / f, "rb") as b:
            committed, regenerated = a.read(), b.read()
        if f.endswith(".json"):
            assert json.loads(committed) == json.loads(regenerated)
            continue
        # tensor bytes first (the clearer failure), then the whole file
        x, y = _arrays(os.path.join(SAMPLES, f)), _arrays(str(out / f))
        assert sorted(x) == sorted(y), f
        for n in x:
            assert x[n].shape == y[n].shape and x[n].tobytes() == y[n].tobytes(), (f, n)
        assert committed == regenerated, f"{f} is not byte-identical"
