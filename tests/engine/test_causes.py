"""Causes of change, from real torch training saved to real files, and synthetic edge cases.

Every training test runs a few optimizer steps on a small model, saves
before/after with safetensors, diffs the files, and checks the cause and its
numbers against what the training did (lr·wd·steps, the rows a gradient
mask let through, torch's own dtype conversions, the adapter's rank). Each
runs on both statistics backends (C and numpy), which must agree.
Tolerances are relative, never bytes: torch kernels differ across CPUs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import ckptdiff
from ckptdiff.cause import CAUSES, Sums, classify, explain
from ckptdiff.checkpoint import Checkpoint

SAMPLES = Path(__file__).resolve().parents[2] / "sample_ckpts"

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

nn = torch.nn


def _save(path, model_or_sd) -> str:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Tanh, not ReLU: a dead unit gets zero gradient rows, and these tests want every element to move.
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def _batch(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)


def _step(model: nn.Module, opt, seed: int, frozen: list | None = None) -> None:
    x, y = _batch(seed)
    opt.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(x), y).backward()
    for p in frozen or []:
        p.grad = torch.zeros_like(p)  # requires_grad switched off, but a zero .grad left behind
    opt.step()


def _causes(report) -> dict[str, tuple[str | None, dict | None]]:
    return {t.name: (t.cause, t.cause_detail) for t in report.tensors}


def test_adamw_on_frozen_params_with_zero_grads_is_weight_decay(tmp_path, stats_backend):
    model = _mlp()
    lr, wd, steps = 1e-3, 0.01, 20
    frozen = list(model[0].parameters()) + list(model[2].parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    old = _save(tmp_path / "old.safetensors", model)
    for p in frozen:
        p.requires_grad_(False)
    for i in range(steps):
        _step(model, opt, i, frozen)
    new = _save(tmp_path / "new.safetensors", model)
    rep = ckptdiff.diff(old, new, manifest={"trainable": ["4.*"], "frozen": ["0.*", "2.*"]})
    causes = _causes(rep)
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        cause, d = causes[name]
        assert cause == "weight_decay", (name, cause, d)
        assert d["c"] == pytest.approx(lr * wd * steps, rel=0.01)
        assert d["cosine"] >= 0.999
    assert causes["4.weight"][0] != "weight_decay"  # trained for real: gradients dominate
    why = [t for t in rep.drifted if t.name == "2.weight"][0]
    assert explain(why.cause, why.cause_detail).startswith("weight decay, Δ = −0.0002·W — frozen parameters")


def test_stale_adam_momentum_is_an_optimizer_step(tmp_path, stats_backend):
    model = _mlp(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, opt, 100)  # one real step: Adam's moments now hold this gradient
    old = _save(tmp_path / "old.safetensors", model)
    frozen = list(model[0].parameters())
    for p in frozen:
        p.requires_grad_(False)
    for i in range(5):
        _step(model, opt, i, frozen)
    new = _save(tmp_path / "new.safetensors", model)
    rep = ckptdiff.diff(old, new)
    cause, d = _causes(rep)["0.weight"]
    assert cause == "optimizer_step", d
    from safetensors.torch import load_file

    delta = (load_file(new)["0.weight"].double() - load_file(old)["0.weight"].double()).abs()
    assert d["typical_abs_delta"] == pytest.approx(float(delta.mean()), rel=1e-4)
    assert d["uniformity"] >= 0.99
    # each stale step moves an element by about lr: five steps, a little less than 5e-3 in all
    assert 1e-3 < d["typical_abs_delta"] < 5e-3


def test_batchnorm_in_train_mode_is_running_stats(tmp_path, stats_backend):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    for p in model[:2].parameters():
        p.requires_grad_(False)
    old = _save(tmp_path / "old.safetensors", model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()  # the mistake: frozen BatchNorm still updates its statistics
    for i in range(3):
        x, y = torch.randn(32, 8) + 1.0, torch.randn(32, 2)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    new = _save(tmp_path / "new.safetensors", model)
    causes = _causes(ckptdiff.diff(old, new))
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert causes[name][0] == "running_stats"
        assert causes[name][1]["buffer"] == name.split(".")[1]
    assert causes["0.weight"] == (None, None) and causes["1.weight"] == (None, None)  # frozen and unmoved


@pytest.mark.parametrize("through", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
def test_saved_through_a_narrow_dtype_is_a_precision_roundtrip(tmp_path, stats_backend, through):
    model = _mlp(3)
    sd = model.state_dict()
    # torch's own conversion is the oracle for round-to-nearest-even
    narrow = {k: v.to(getattr(torch, through)).to(torch.float32) for k, v in sd.items()}
    rep = ckptdiff.diff(_save(tmp_path / "a.safetensors", sd), _save(tmp_path / "b.safetensors", narrow))
    for t in rep.tensors:
        assert t.cause == "precision_roundtrip" and t.cause_detail["dtype"] == through, (t.name, t.cause)


def test_a_real_update_is_not_a_precision_roundtrip(stats_backend):
    w = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    import ml_dtypes

    rounded = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    rounded[4000] = np.nextafter(rounded[4000], np.float32(10))  # one value off the bf16 grid
    rep = ckptdiff.diff(Checkpoint.from_arrays({"w": w}), Checkpoint.from_arrays({"w": rounded}))
    assert rep.tensors[0].cause != "precision_roundtrip"


def test_new_token_embeddings_are_sparse_rows(tmp_path, stats_backend):
    torch.manual_seed(4)
    emb = nn.Embedding(200, 16)  # rows 190.. reserved for tokens added later
    old = _save(tmp_path / "old.safetensors", emb)
    new_ids = torch.tensor([193, 195, 197])
    mask = torch.zeros(200, 1)
    mask[new_ids] = 1.0
    emb.weight.register_hook(lambda g: g * mask)  # train only the new tokens' rows
    opt = torch.optim.Adam(emb.parameters(), lr=1e-2)
    for i in range(5):
        ids = torch.cat([new_ids, torch.randint(0, 190, (20,))])
        opt.zero_grad()
        emb(ids).pow(2).sum().backward()
        opt.step()
    rep = ckptdiff.diff(old, _save(tmp_path / "new.safetensors", emb))
    cause, d = _causes(rep)["weight"]
    assert cause == "sparse_rows"
    assert d == {"rows": 3, "of": 200, "first": [193, 195, 197]}


def test_sparse_rows_across_chunks_agree(stats_backend):
    w = np.random.default_rng(5).standard_normal((4000, 100)).astype(np.float32)
    v = w.copy()
    rows = [1, 999, 1000, 2500, 3999]
    v[rows, 7] += 1.0
    v[1000, :] += 1.0
    # 64 KiB chunks: row 1000 and others straddle chunk boundaries
    rep = ckptdiff.diff(Checkpoint.from_arrays({"w": w}), Checkpoint.from_arrays({"w": v}), chunk_bytes=1 << 16)
    assert rep.tensors[0].cause == "sparse_rows"
    assert rep.tensors[0].cause_detail == {"rows": 5, "of": 4000, "first": rows}


def test_reinitialized_head(tmp_path, stats_backend):
    model = _mlp(6)
    old = _save(tmp_path / "old.safetensors", model)
    torch.manual_seed(7)
    model[2].reset_parameters()
    model[4].reset_parameters()
    causes = _causes(ckptdiff.diff(old, _save(tmp_path / "new.safetensors", model)))
    assert causes["2.weight"][0] == "reinitialized"
    assert abs(causes["2.weight"][1]["cosine"]) < 0.1
    assert causes["2.weight"][1]["rel_l2"] > 1.0
    assert causes["0.weight"] == (None, None)


def test_zeroed_tensor_is_reinitialized_not_decay(stats_backend):
    w = np.random.default_rng(8).standard_normal((32, 8)).astype(np.float32)
    rep = ckptdiff.diff(Checkpoint.from_arrays({"w": w}), Checkpoint.from_arrays({"w": np.zeros_like(w)}))
    assert rep.tensors[0].cause == "reinitialized" and rep.tensors[0].cause_detail["cosine"] is None


def test_merged_lora_is_low_rank_only_with_rank(tmp_path, stats_backend):
    torch.manual_seed(9)
    base = nn.Linear(96, 128)
    old = _save(tmp_path / "old.safetensors", base)
    r, alpha = 4, 8
    a = nn.Parameter(torch.randn(r, 96) * 0.01)
    b = nn.Parameter(torch.zeros(128, r))  # LoRA's init: B = 0, so training starts at the base model
    opt = torch.optim.Adam([a, b], lr=1e-2)
    for i in range(10):
        x, y = torch.randn(16, 96), torch.randn(16, 128)
        opt.zero_grad()
        out = base(x) + (alpha / r) * (x @ a.T @ b.T)
        nn.functional.mse_loss(out, y).backward()
        opt.step()
    with torch.no_grad():
        base.weight += (alpha / r) * (b @ a)  # the merge
    new = _save(tmp_path / "new.safetensors", base)
    plain = _causes(ckptdiff.diff(old, new))["weight"][0]
    assert plain != "low_rank"
    cause, d = _causes(ckptdiff.diff(old, new, rank=8))["weight"]
    assert cause == "low_rank"
    assert d["rank"] == r and d["energy"] >= 0.99 and d["max_rank"] == 8
    # a smaller bound than the adapter's rank does not fit
    assert _causes(ckptdiff.diff(old, new, rank=2))["weight"][0] != "low_rank"


def test_nan_introduced(stats_backend):
    w = np.ones((4, 4), np.float32)
    v = w.copy()
    v[1, 1] = np.nan
    rep = ckptdiff.diff(Checkpoint.from_arrays({"w": w}), Checkpoint.from_arrays({"w": v}))
    assert (rep.tensors[0].cause, rep.tensors[0].cause_detail) == ("nan_inf", {"nan_new": 1, "inf_new": 0})


@pytest.mark.parametrize("old,new", [
    (np.array([1.0, 2.0, 3.0], np.float32), np.array([0.999, 1.998, 2.997], np.float32)),  # tiny: no statistics
    (np.arange(64, dtype=np.int64), np.arange(64, dtype=np.int64) * 2),
    (np.zeros(64, bool), np.ones(64, bool)),
    (np.zeros((16, 16), np.float32), np.full((16, 16), 0.01, np.float32)),  # cosine with old undefined
    (np.zeros((16, 16), np.float32), np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)),
])
def test_edge_cases_get_a_cause_and_valid_json(stats_backend, old, new):
    rep = ckptdiff.diff(Checkpoint.from_arrays({"t": old}), Checkpoint.from_arrays({"t": new}))
    t = rep.tensors[0]
    assert t.cause in CAUSES
    if old.size < 8 or old.dtype.kind != "f":
        assert t.cause == "dense_update"  # no statistical claim on 3 numbers, ints or bools
    if not old.any():
        assert t.cause not in ("weight_decay", "rescaled", "reinitialized")
        assert t.cause_detail.get("cosine") is None
    json.loads(rep.to_json())  # strict JSON: no NaN/Inf leaks from the evidence


def test_classify_is_pure_and_total():
    # every combination of a zero/huge/NaN norm gives some cause without raising
    for old_norm in (0.0, 1.0, 1e300, math.inf):
        for delta_norm in (0.0, 1e-300, 1.0, math.inf):
            s = Sums(name="x", is_float=True, numel=100, changed=100, sum_abs_delta=delta_norm * 10,
                     delta_norm=delta_norm, old_norm=old_norm, sum_old_delta=-old_norm * delta_norm)
            assert classify(s)[0] in CAUSES


def test_shipped_drifted_sample_says_why_in_words(capsys):
    from ckptdiff.cli import main

    rc = main(["diff", str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetune_drifted.safetensors"),
               "-m", str(SAMPLES / "manifest.json"), "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1
    by = {t["name"]: t for t in data["tensors"]}
    for name in ("backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "backbone.1.weight"):
        assert by[name]["cause"] == "weight_decay"
        assert by[name]["cause_detail"]["c"] == pytest.approx(0.003196, rel=1e-3)
    for name in ("backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"):
        assert by[name]["cause"] == "running_stats"
    main(["diff", str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetune_drifted.safetensors"),
          "-m", str(SAMPLES / "manifest.json")])
    out = capsys.readouterr().out
    assert ("backbone.3.weight drifted: weight decay, Δ = −0.0032·W — frozen parameters are still in an "
            "optimizer with weight_decay > 0") in out


def test_markdown_groups_tensors_that_share_a_cause(capsys):
    from ckptdiff.cli import main

    main(["diff", str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetune_drifted.safetensors"),
          "-m", str(SAMPLES / "manifest.json"), "--format", "markdown"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("- ")]
    decay = [x for x in lines if "weight decay" in x]
    assert len(decay) == 1 and "and 2 more drifted: weight decay, Δ = −0.0032·W" in decay[0]
    assert len(lines) == 4  # decay, and one line per running-statistics buffer
