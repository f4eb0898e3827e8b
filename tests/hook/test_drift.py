"""Live frozen-drift detection in real training loops: the right step, the right tensors, exact numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hook_helpers import Net, freeze, host, make_data, train_step

import ckptdiff
from ckptdiff.hook import DriftWarning, FrozenDriftError
from ckptdiff.store import Store

torch = pytest.importorskip("torch")

# The audit's warnings for these deliberately buggy setups are tested in test_audit.py.
pytestmark = pytest.mark.filterwarnings("ignore::ckptdiff.hook.AuditWarning")

BACKBONE_PARAMS = {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
                   "backbone.3.weight", "backbone.3.bias"}
BN_BUFFERS = {"backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"}


def _drift_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, DriftWarning)]


def _stale_momentum_setup(net, x, y, opt=None):
    """Train everything for a few steps, then 'freeze' the backbone but keep the same optimizer."""
    opt = opt or torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        train_step(net, opt, x, y)
    freeze(net.backbone)
    net.backbone.eval()
    return opt


def test_clean_selective_fine_tune_has_no_false_positive(net, data, store_dir, no_warnings):
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ckptdiff.track(net, opt, store=store_dir, every=4, check_every=1) as tracker:
        for _ in range(10):
            net.train()
            net.backbone.eval()
            train_step(net, opt, x, y, set_to_none=False)
    assert [str(w.message) for w in no_warnings] == []
    assert tracker.drift_events == [] and tracker.errors == [] and tracker.stale == []
    assert tracker.stats["checksummed_bytes"] > 0  # the backstop really ran
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("backbone"), n
    tags = [(s.step, s.tag) for s in Store.open(store_dir).list()]
    assert tags == [(0, "baseline"), (4, None), (8, None), (10, None)]


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=str)
def test_stale_momentum_moves_frozen_weights_and_is_caught_at_the_first_step(impl, net, data, store_dir):
    # fused=True writes the parameters without bumping their version counter: still caught at step 1.
    x, y = data
    opt = _stale_momentum_setup(net, x, y, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0, **impl))
    frozen_before = {n: host(p) for n, p in net.named_parameters() if n.startswith("backbone")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ckptdiff.track(net, opt, store=store_dir, every=50)
        train_step(net, opt, x, y, set_to_none=False)  # zero grads, live momentum: AdamW still moves them
        after_first = {n: host(p) for n, p in net.named_parameters() if n.startswith("backbone")}
        for _ in range(4):
            train_step(net, opt, x, y, set_to_none=False)
        tracker.close()
    events = tracker.drift_events
    assert {e.step for e in events} == {1}
    assert {e.name for e in events} == BACKBONE_PARAMS
    for e in events:
        ref = np.abs(after_first[e.name] - frozen_before[e.name])
        assert e.changed == int(np.count_nonzero(ref)) and e.changed > 0
        assert e.max_abs_delta == pytest.approx(float(ref.max()), rel=0, abs=0)
        assert e.confirmed and e.last_clean_step == 0
    texts = _drift_warnings(caught)
    assert len(texts) == 1 and "moved at step 1" in texts[0] and "backbone.0.weight" in texts[0]
    # One report per tensor: the later steps move them again but warn no more.
    store = Store.open(store_dir)
    drift = store.resolve("drift")
    assert drift.step == 1 and "frozen drift at step 1" in drift.message
    assert drift.metrics["drift_max_abs/backbone.0.weight"] == pytest.approx(
        float(np.abs(after_first["backbone.0.weight"] - frozen_before["backbone.0.weight"]).max()), rel=0, abs=0)
    # The drift snapshot holds the moved bytes, the baseline the original ones.
    moved = store.open_snapshot(drift.id)["backbone.0.weight"].numpy().astype(np.float64)
    base = store.open_snapshot("baseline")["backbone.0.weight"].numpy().astype(np.float64)
    np.testing.assert_array_equal(moved, after_first["backbone.0.weight"])
    np.testing.assert_array_equal(base, frozen_before["backbone.0.weight"])


def test_weight_decay_moves_frozen_weights_without_gradients(net, data, store_dir):
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    # SGD applies weight decay to any param that has a .grad: give the frozen ones a zero grad,
    # as a 'zero_grad(set_to_none=False)' after an earlier unfrozen phase leaves them.
    for p in net.backbone.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.01)
    w0 = host(net.backbone[0].weight)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=10, on_drift="record")
    for step in range(1, 4):
        train_step(net, opt, x, y, set_to_none=False)
    tracker.close()
    events = {e.name: e for e in tracker.drift_events}
    assert set(events) == BACKBONE_PARAMS - {"backbone.1.bias"}  # zero-initialised: decay leaves it at 0
    assert {e.step for e in events.values()} == {1}
    # weight decay alone: w <- w - lr * wd * w, so max |Δ| is lr*wd*max|w| (within fp32 rounding)
    expected = float(np.max(np.abs(w0)) * 0.1 * 0.01)
    assert events["backbone.0.weight"].max_abs_delta == pytest.approx(expected, rel=1e-3)


def test_batchnorm_running_stats_in_train_mode_are_caught_at_step_one(net, data, store_dir):
    x, y = data
    freeze(net.backbone)
    opt = torch.optim.AdamW(net.head.parameters(), lr=1e-2)
    bn = net.backbone[1]
    mean0 = host(bn.running_mean)
    net.train()  # the mistake: the frozen backbone's BatchNorm trains its statistics
    with pytest.warns(DriftWarning, match="BatchNorm running statistics"):
        tracker = ckptdiff.track(net, opt, store=store_dir, every=100)
        train_step(net, opt, x, y)
    mean1 = host(bn.running_mean)
    tracker.close()
    events = {e.name: e for e in tracker.drift_events}
    assert set(events) == BN_BUFFERS  # and no parameter
    assert all(e.step == 1 and e.kind == "buffer" for e in events.values())
    assert events["backbone.1.running_mean"].max_abs_delta == pytest.approx(float(np.abs(mean1 - mean0).max()),
                                                                           rel=0, abs=0)
    assert events["backbone.1.num_batches_tracked"].max_abs_delta == 1.0


def test_raise_stops_training_at_the_first_drifted_step(net, data, store_dir):
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    completed = []
    with pytest.raises(FrozenDriftError) as err:
        with ckptdiff.track(net, opt, store=store_dir, every=100, on_drift="raise"):
            for step in range(1, 11):
                if step == 6:  # a bug in the loop: something writes into a frozen weight
                    with torch.no_grad():
                        net.backbone[3].bias[2] += 0.5
                train_step(net, opt, x, y)
                completed.append(step)
    assert completed == [1, 2, 3, 4, 5]
    e = err.value
    assert e.step == 6 and [ev.name for ev in e.events] == ["backbone.3.bias"]
    assert e.events[0].changed == 1 and e.events[0].max_abs_delta == pytest.approx(0.5, rel=1e-6)
    assert e.events[0].last_clean_step == 5  # the version counter proves it was untouched until step 5
    assert "backbone.3.bias (frozen parameter) moved at step 6" in str(e)
    assert Store.open(store_dir).resolve("drift").step == 6


def test_single_ulp_write_through_data_is_caught_by_the_backstop(net, data, store_dir):
    # `.data` writes do not bump the version counter: only the rotating checksum sees them.
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=100, backstop_every=3, on_drift="record")
    w = net.backbone[0].weight
    old = w.data[0, 0, 0].item()
    v0 = w._version
    new = float(np.nextafter(np.float32(old), np.float32(np.inf)))
    w.data[0, 0, 0] = new
    assert w._version == v0
    for _ in range(3):
        train_step(net, opt, x, y)
    tracker.close()
    (e,) = tracker.drift_events
    assert e.name == "backbone.0.weight" and e.changed == 1
    assert e.step <= 3  # found within one backstop cycle
    assert e.max_abs_delta == abs(new - old) > 0


def test_deferred_checks_attribute_the_step_of_the_launch(net, data, store_dir):
    # The CUDA path reads checksums one check late to avoid a GPU sync; run the same logic on CPU.
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=100, on_drift="record")
    tracker._drift.defer = True
    for step in range(1, 7):
        if step == 4:
            with torch.no_grad():
                net.backbone[0].bias.mul_(1.5)
        train_step(net, opt, x, y)
        if step == 4:
            assert tracker.drift_events == []  # not read yet
    tracker.close()
    (e,) = tracker.drift_events
    assert e.name == "backbone.0.bias" and e.step == 4
    drift = Store.open(store_dir).resolve("drift")
    assert "frozen drift at step 4" in drift.message
    assert drift.step == 5  # its bytes were captured when the deferred result was read


def test_record_is_silent_and_warn_reports_once(net, data, store_dir):
    x, y = data
    opt = _stale_momentum_setup(net, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ckptdiff.track(net, opt, store=store_dir, on_drift="record") as tracker:
            for _ in range(3):
                train_step(net, opt, x, y, set_to_none=False)
    assert _drift_warnings(caught) == []
    assert {e.name for e in tracker.drift_events} == BACKBONE_PARAMS


def test_check_every_spaces_the_checks(net, data, store_dir):
    x, y = data
    opt = _stale_momentum_setup(net, x, y)
    tracker = ckptdiff.track(net, opt, store=store_dir, check_every=4, on_drift="record")
    for _ in range(5):
        train_step(net, opt, x, y, set_to_none=False)
    assert {e.step for e in tracker.drift_events} == {4}
    assert {e.last_clean_step for e in tracker.drift_events} == {0}
    assert "between steps 0 and 4" in tracker.drift_events[0].describe()
    tracker.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, data, store_dir):
    torch.manual_seed(0)
    net = Net(dtype)
    x, y = make_data(dtype=dtype)
    # SGD with momentum: AdamW's eps=1e-8 underflows in fp16 and turns the weights into NaN.
    opt = _stale_momentum_setup(net, x, y, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    before = {n: host(p) for n, p in net.backbone.named_parameters(prefix="backbone")}
    tracker = ckptdiff.track(net, opt, store=store_dir, every=2, on_drift="record")
    train_step(net, opt, x, y, set_to_none=False)
    after = {n: host(p) for n, p in net.backbone.named_parameters(prefix="backbone")}
    train_step(net, opt, x, y, set_to_none=False)
    tracker.close()
    moved = {n for n in before if not np.array_equal(before[n], after[n])}
    assert len(moved) >= 4  # (a bias right before BatchNorm gets ~0 gradient and may round to no change)
    events = {e.name: e for e in tracker.drift_events if e.step == 1}
    assert set(events) == moved
    for n in moved:
        assert events[n].max_abs_delta == float(np.abs(after[n] - before[n]).max())
        assert events[n].changed == int(np.count_nonzero(after[n] != before[n]))
    store = Store.open(store_dir)
    snap = store.open_snapshot("latest")
    assert snap["head.weight"].dtype == str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(snap["head.weight"].numpy().astype(np.float64), host(net.head.weight))


def test_transformer_selective_fine_tune_has_no_false_positive(store_dir, no_warnings):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.TransformerEncoder(layer, 2,
                                enable_nested_tensor=False))
    head = torch.nn.Linear(32, 3)
    full = torch.nn.ModuleDict({"body": model, "head": head})
    for p in full.parameters():
        p.requires_grad_(False)
    for p in list(model[1].layers[1].parameters()) + list(head.parameters()):
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    idx, y = torch.randint(0, 50, (8, 12), generator=g), torch.randint(0, 3, (8,), generator=g)
    frozen_before = {n: p.detach().clone() for n, p in full.named_parameters() if not p.requires_grad}
    with ckptdiff.track(full, opt, store=store_dir, every=5) as tracker:
        full.train()  # dropout on; no norm statistics to drift
        for _ in range(15):
            loss = torch.nn.functional.cross_entropy(head(model(idx).mean(1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.log(loss=loss)
    assert [str(w.message) for w in no_warnings] == []
    assert tracker.drift_events == [] and tracker.stale == [] and tracker.errors == []
    assert all(torch.equal(p, frozen_before[n]) for n, p in full.named_parameters() if n in frozen_before)
    assert len(tracker.manifest.trainable) == 14 and len(tracker.manifest.frozen) == 13
    infos = Store.open(store_dir).list()
    assert [i.step for i in infos] == [0, 5, 10, 15]
    assert all(isinstance(i.metrics["loss"], float) for i in infos[1:])


def test_a_frozen_parameter_replaced_by_a_new_object_is_followed(net, data, store_dir):
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=2, on_drift="record")
    old = net.backbone[0].bias
    for step in range(1, 6):
        if step == 2:  # e.g. a LoRA/quantisation helper swapping the module's attribute
            net.backbone[0].bias = torch.nn.Parameter(old.detach() + 0.125, requires_grad=False)
        train_step(net, opt, x, y)
    tracker.close()
    (e,) = tracker.drift_events
    # Seen at the snapshot after the swap (step 2), then checksummed at the next check (step 3).
    assert e.name == "backbone.0.bias" and e.step == 3
    assert e.max_abs_delta == pytest.approx(0.125, rel=1e-6) and e.changed == 8
    snap = Store.open(store_dir).open_snapshot("latest")
    assert snap["backbone.0.bias"].read() == net.backbone[0].bias.detach().numpy().tobytes()
