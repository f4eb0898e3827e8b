"""The hook in the loops people actually write: LoRA + bf16 autocast + accumulation, tied and shared weights,
lifecycle mistakes (double track, double close, exceptions, Ctrl-C, forgotten trackers), slow or read-only stores.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import pytest
from hook_helpers import Net, freeze, raw, train_step

import ckptdiff
from ckptdiff import hook as hook_mod
from ckptdiff.hook import failures as hook_failures
from ckptdiff.hook import metrics as hook_metrics
from ckptdiff.hook import DriftWarning, StoreWarning, TrackerError
from ckptdiff.store import Store
from ckptdiff.store.blobs import TMP_DIR

torch = pytest.importorskip("torch")
nn = torch.nn


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (B starts at zero, as in the LoRA paper)."""

    def __init__(self, base: nn.Linear, r: int = 4) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.05)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def _lora_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    enc.requires_grad_(False)
    for blk in enc.layers:
        blk.linear1 = LoRALinear(blk.linear1)
        blk.linear2 = LoRALinear(blk.linear2)
    return enc


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "ckptdiff-writer"]


def _collected(ref: weakref.ref, timeout: float = 10.0) -> bool:
    """gc until ``ref`` dies: a job still running on the writer thread holds the tracker until it ends."""
    deadline = time.monotonic() + timeout
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return ref() is None


def _wait_for_threads(before: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while len(_writer_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(_writer_threads())


def test_lora_transformer_bf16_autocast_with_accumulation_scheduler_and_clipping(store_dir, no_warnings):
    enc = _lora_encoder()
    enc.train()  # dropout on in the frozen layers too: nothing there has running statistics
    adapters = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters, lr=5e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 6, 32, generator=g), torch.randn(4, 6, 32, generator=g)
    accum = 3
    at_step: dict[int, dict[str, bytes]] = {}
    with ckptdiff.track(enc, opt, store=store_dir, every=2) as tracker:
        for micro in range(1, 7 * accum + 1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(enc(x).float(), target) / accum
            loss.backward()
            if micro % accum == 0:
                nn.utils.clip_grad_norm_(adapters, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                tracker.log(loss=loss.detach() * accum, lr=sched.get_last_lr()[0])
                at_step[tracker.current_step] = {k: raw(v) for k, v in enc.state_dict().items()}
    # Only real updates count: 21 micro-batches with accumulation 3 are 7 optimizer steps.
    assert tracker.current_step == 7
    lora = sorted(n for n, p in enc.named_parameters() if n.endswith((".A", ".B")))
    assert sorted(tracker.manifest.trainable) == lora and len(lora) == 8
    assert len(tracker.manifest.frozen) == len(enc.state_dict()) - 8 and not tracker.manifest.buffers
    assert tracker.drift_events == [] and tracker.stale == [] and tracker.errors == []
    store = Store.open(store_dir)
    infos = store.list()
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (2, None), (4, None), (6, None), (7, None)]
    # Each periodic snapshot holds exactly the state after that step's update, with that step's metrics.
    for info in infos[1:]:
        snap = store.open_snapshot(info.id)
        for name, expected in at_step[info.step].items():
            assert snap[name].read() == expected, (info.step, name)
        lr = 5e-3 * 0.5 ** (info.step // 2)
        assert info.metrics["lr"] == pytest.approx(lr, rel=1e-12)
    # The frozen transformer weights never moved, bit for bit.
    base, last = store.entries("baseline"), store.entries("latest")
    frozen = set(tracker.manifest.frozen)
    assert {n for n in base if base[n].hash != last[n].hash} == set(lora)
    assert frozen and all(base[n].hash == last[n].hash for n in frozen)


class _TiedLM(nn.Module):
    """Embedding and LM head share one Parameter; one block is used twice (a shared module)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.block_again = self.block
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("causal", torch.ones(8), persistent=False)

    def forward(self, idx):
        h = self.emb(idx)
        h = torch.relu(self.block_again(torch.relu(self.block(h)))) * self.causal
        return self.head(self.proj(h))


def test_tied_shared_and_non_persistent_tensors_give_no_duplicate_or_false_report(store_dir, no_warnings):
    torch.manual_seed(0)
    m = _TiedLM()
    m.proj.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": [m.emb.weight, m.block.weight], "weight_decay": 0.1},
                             {"params": [m.block.bias], "weight_decay": 0.0}], lr=1e-2)
    idx = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    with ckptdiff.track(m, opt, store=store_dir, every=2) as tracker:
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
            opt.step()
    assert sorted(tracker.manifest.trainable) == ["block.bias", "block.weight", "block_again.bias",
                                                  "block_again.weight", "emb.weight", "head.weight"]
    assert tracker.manifest.frozen == ("proj.weight", "proj.bias")
    # One slot per distinct tensor: the tied and shared ones are staged once.
    assert tracker.stats["trainable_tensors"] == 2 + 1 and tracker.stats["frozen_tensors"] == 2
    assert tracker.audit_report.findings == [] and tracker.drift_events == [] and tracker.stale == []
    entries = Store.open(store_dir).entries("latest")
    assert "causal" not in entries  # not part of the state_dict, so not part of a checkpoint either
    assert entries["emb.weight"].hash == entries["head.weight"].hash
    assert entries["block.weight"].hash == entries["block_again.weight"].hash


def test_a_tied_frozen_weight_that_drifts_is_reported_once_under_both_names(store_dir):
    torch.manual_seed(0)
    m = _TiedLM()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    idx = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))

    def step(set_to_none):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()

    step(True)  # momentum buffers exist now
    m.emb.requires_grad_(False)  # "freeze" the tied embedding, keep the optimizer: stale momentum moves it
    before = m.emb.weight.detach().double().numpy().copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ckptdiff.track(m, opt, store=store_dir, every=10, on_drift="record") as tracker:
            step(False)
            step(False)
    assert "frozen-in-optimizer" in tracker.audit_report.codes()
    assert not [w for w in caught if issubclass(w.category, DriftWarning)]
    [event] = tracker.drift_events
    assert event.names == ("emb.weight", "head.weight") and event.step == 1
    # Step 1 moved it by lr * momentum * buf, exactly what the confirmation measured against the baseline.
    ref = Store.open(store_dir).open_snapshot(event.snapshot)["emb.weight"].numpy().astype(np.float64)
    assert event.max_abs_delta == float(np.abs(ref - before).max()) > 0
    assert event.changed == int(np.count_nonzero(ref != before))


def test_frozen_dropout_in_train_mode_and_models_without_frozen_parameters_are_silent(store_dir, tmp_path,
                                                                                      no_warnings):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    m[0].requires_grad_(False)
    m.train()  # the frozen part has only Dropout besides its Linear: no running statistics to drift
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    with ckptdiff.track(m, opt, store=store_dir, every=3) as tracker:
        for _ in range(6):
            train_step(m, opt, x, y)
    assert tracker.audit_report.findings == [] and tracker.drift_events == []
    # The BatchNorm of a trained module moves, as it should: a buffer, not drift.
    assert tracker.manifest.buffers == ("3.running_mean", "3.running_var", "3.num_batches_tracked")

    full = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(full.parameters(), lr=1e-2)
    with ckptdiff.track(full, opt, store=str(tmp_path / "all"), every=2) as tracker:
        for _ in range(4):
            train_step(full, opt, x, y)
    assert tracker.manifest.frozen == () and tracker.stats["frozen_tensors"] == 0
    assert tracker.stats["checksummed_bytes"] == 0  # nothing frozen: the drift check costs nothing
    assert [i.step for i in Store.open(str(tmp_path / "all")).list()] == [0, 2, 4]


def test_a_second_track_of_the_same_model_is_refused_until_the_first_is_closed(net, data, store_dir, tmp_path):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    first = ckptdiff.track(net, opt, store=store_dir, every=2)
    threads = len(_writer_threads())
    with pytest.raises(TrackerError, match="already tracked by .*exp1.*call close"):
        ckptdiff.track(net, opt, store=str(tmp_path / "other"), every=2)
    with pytest.raises(TrackerError, match="this optimizer is already tracked"):
        ckptdiff.track(Net(), opt, store=str(tmp_path / "other"), every=2)
    assert len(_writer_threads()) == threads  # the refused ones started nothing
    assert not os.path.exists(tmp_path / "other")
    train_step(net, opt, *data)
    train_step(net, opt, *data)
    assert first.current_step == 2
    # A notebook that lost the handle can find it again.
    assert hook_mod.open_tracker(net) is first and hook_mod.open_tracker(opt) is first
    hook_mod.open_tracker(net).close()
    assert hook_mod.open_tracker(net) is None
    # Closed: tracking again is fine and resumes the same history.
    with ckptdiff.track(net, opt, store=store_dir, every=2) as again:
        train_step(net, opt, *data)
    assert again.start_step == 2 and again.current_step == 3


def test_close_twice_removes_the_hooks_and_lets_the_model_go(data, store_dir):
    net = Net()
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    before = len(_writer_threads())
    tracker = ckptdiff.track(net, opt, store=store_dir, every=2)
    train_step(net, opt, *data)
    tracker.close()
    tracker.close()  # idempotent
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    train_step(net, opt, *data)  # an optimizer step after close is not counted, and nothing breaks
    assert tracker.current_step == 1
    assert _wait_for_threads(before) == before
    with pytest.raises(TrackerError, match="closed"):
        tracker.snapshot()
    model_ref, tracker_ref = weakref.ref(net), weakref.ref(tracker)
    del net, opt, tracker
    gc.collect()  # closed: nothing of ours is running, so one collection frees them
    assert model_ref() is None and tracker_ref() is None


def test_a_forgotten_tracker_does_not_keep_its_model_or_thread_alive(data, store_dir):
    before = len(_writer_threads())

    def train():
        torch.manual_seed(0)
        net = Net()
        freeze(net.backbone)
        net.backbone.eval()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        ckptdiff.track(net, opt, store=store_dir, every=2)  # never closed, result not even kept
        for _ in range(3):
            train_step(net, opt, *data)
        return weakref.ref(net)

    model_ref = train()
    assert _collected(model_ref)
    assert _wait_for_threads(before) == before
    # What was written before it was dropped is intact and readable.
    assert [i.step for i in Store.open(store_dir).list()] == [0, 2]


def test_an_exception_in_the_with_block_propagates_after_the_flush(net, data, store_dir):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="bad batch") as info:
        with ckptdiff.track(net, opt, store=store_dir, every=10):
            for i in range(3):
                train_step(net, opt, *data)
            raise ValueError("bad batch")
    assert info.value.__context__ is None  # nothing of ours chained onto it
    infos = Store.open(store_dir).list()
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (3, None)]  # the final snapshot was flushed
    snap = Store.open(store_dir).open_snapshot("latest")
    assert all(snap[k].read() == raw(v) for k, v in net.state_dict().items())


def test_a_failing_close_does_not_hide_the_users_exception(net, data, store_dir, monkeypatch):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="bad batch"):
            with ckptdiff.track(net, opt, store=store_dir, every=10) as tracker:
                train_step(net, opt, *data)

                def broken(*a, **k):
                    raise RuntimeError("device lost")
                monkeypatch.setattr(tracker._watch, "launch", broken)  # the final drift check fails
                raise ValueError("bad batch")
    assert any("closing after ValueError: RuntimeError: device lost" in e for e in tracker.errors)
    assert any(issubclass(w.category, StoreWarning) and "device lost" in str(w.message) for w in caught)
    assert not opt._optimizer_step_post_hooks  # still detached
    assert tracker._writer.closed


def test_keyboard_interrupt_mid_run_keeps_the_history_and_the_interrupt(net, data, store_dir):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = data
    calls = {"n": 0}

    def interrupt_on_fifth_forward(module, inputs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C lands mid-step, between two optimizer.step() calls

    net.head.register_forward_pre_hook(interrupt_on_fifth_forward)
    with pytest.raises(KeyboardInterrupt):
        with ckptdiff.track(net, opt, store=store_dir, every=2) as tracker:
            for _ in range(10):
                train_step(net, opt, x, y)
    assert tracker.current_step == 4
    store = Store.open(store_dir)
    assert [(i.step, i.tag) for i in store.list()] == [(0, "baseline"), (2, None), (4, None)]
    snap = store.open_snapshot("latest")
    assert all(snap[k].read() == raw(v) for k, v in net.state_dict().items())
    assert not opt._optimizer_step_post_hooks


def test_every_step_snapshots_apply_backpressure_and_stay_exact(store_dir):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    m[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    states = {}
    with ckptdiff.track(m, opt, store=store_dir, every=1) as tracker:
        for _ in range(30):
            loss = train_step(m, opt, x, y)
            tracker.log(loss=loss)
            states[tracker.current_step] = (raw(m[1].weight), loss)
    stats = tracker.stats
    assert stats["snapshots_written"] == 31  # baseline + one per step: none dropped, none queued
    assert stats["staging_bytes"] == (16 * 4 + 4) * 4  # host memory: one snapshot of the trainable tensors
    assert tracker._staging.held_bytes == 0  # and freed at close, though the tracker object lives on
    assert stats["writer_stall_seconds"] >= 0.0
    store = Store.open(store_dir)
    infos = store.list()
    assert [i.step for i in infos] == list(range(31))
    for info in infos[1:]:
        w, loss = states[info.step]
        assert store.open_snapshot(info.id)["1.weight"].read() == w
        assert info.metrics["loss"] == pytest.approx(loss, rel=1e-12)


def test_a_read_only_store_fails_at_attach_with_a_clear_error(net, store_dir, monkeypatch):
    Store.open(store_dir, create=True).close()
    import ckptdiff.store.store as store_impl

    real_access = os.access
    monkeypatch.setattr(store_impl.os, "access",
                        lambda p, mode, *a, **k: False if (mode & os.W_OK and os.fspath(p).startswith(store_dir))
                        else real_access(p, mode, *a, **k))
    before = len(_writer_threads())
    with pytest.raises(TrackerError, match=r"cannot open the snapshot store: store is read-only.*write to"):
        ckptdiff.track(net, store=store_dir)
    assert _wait_for_threads(before) == before
    monkeypatch.undo()
    ckptdiff.track(net, store=store_dir).close()  # the refused attach left the model free to track


def test_a_store_that_keeps_failing_warns_once_per_streak_with_a_bounded_error_list(net, data, store_dir,
                                                                                    monkeypatch):
    monkeypatch.setattr(hook_failures, "MAX_ERRORS", 5)
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    tmp_dir = os.path.join(store_dir, TMP_DIR)

    def break_disk():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        with open(tmp_dir, "w") as f:
            f.write("not a directory")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ckptdiff.track(net, opt, store=store_dir, every=1)
        break_disk()
        for _ in range(8):
            train_step(net, opt, *data)
        tracker.flush()
        assert len([w for w in caught if w.category is StoreWarning]) == 1
        os.remove(tmp_dir)  # the disk recovers: the next snapshot writes, and a new streak warns again
        train_step(net, opt, *data)
        tracker.flush()
        break_disk()
        for _ in range(3):
            train_step(net, opt, *data)
        tracker.flush()
        os.remove(tmp_dir)
        tracker.close()
    store_warnings = [str(w.message) for w in caught if w.category is StoreWarning]
    assert len(store_warnings) == 3, store_warnings
    assert "at step 1:" in store_warnings[0] and "at step 10:" in store_warnings[1]
    assert "11 store failure(s) in this run, 9 of them not warned about" in store_warnings[2]
    assert tracker.store_failures == 11 and len(tracker.errors) == 5
    # The last periodic write failed, so close() wrote the final state once the disk was back.
    assert [i.step for i in Store.open(store_dir).list()] == [0, 9, 12]


def test_a_snapshot_is_written_while_the_loop_pauses_and_late_metrics_go_to_the_next(net, data, store_dir,
                                                                                     monkeypatch):
    monkeypatch.setattr(hook_metrics, "SEAL_TIMEOUT_S", 0.2)
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    with ckptdiff.track(net, opt, store=store_dir, every=2) as tracker:
        train_step(net, opt, *data)
        train_step(net, opt, *data)  # snapshot at step 2 ... then a long evaluation, no more steps
        deadline = time.monotonic() + 10
        while len(Store.open(store_dir).list()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [i.step for i in Store.open(store_dir).list()] == [0, 2]  # on disk while the loop waits
        tracker.log(val_loss=0.25)  # too late for step 2's snapshot: kept for the next one, not lost
        train_step(net, opt, *data)
        train_step(net, opt, *data)
        tracker.log(loss=1.5)
    infos = Store.open(store_dir).list()
    assert [i.step for i in infos] == [0, 2, 4]
    assert infos[1].metrics == {}
    assert infos[2].metrics == {"val_loss": 0.25, "loss": 1.5}


def test_a_failure_inside_the_hook_is_reported_and_training_goes_on(net, data, store_dir, monkeypatch):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ckptdiff.track(net, opt, store=store_dir, every=2) as tracker:
            real = tracker._watch.launch
            calls = {"n": 0}

            def flaky(*a, **k):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("CUDA error: an illegal memory access")
                return real(*a, **k)
            monkeypatch.setattr(tracker._watch, "launch", flaky)
            for _ in range(4):
                train_step(net, opt, *data)
    assert tracker.current_step == 4
    assert tracker.errors == ["the hook failed at step 2: RuntimeError: CUDA error: an illegal memory access"]
    [w] = [str(w.message) for w in caught if w.category is StoreWarning]
    assert w.startswith("ckptdiff: tracker ") and "training continues" in w
    assert [i.step for i in Store.open(store_dir).list()] == [0, 2, 4]


def test_close_waits_for_a_slow_snapshot_in_flight_and_never_runs_two(net, data, store_dir, monkeypatch):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    real_snapshot = Store.snapshot
    state = {"running": 0, "most": 0}
    lock = threading.Lock()

    def slow_snapshot(self, *a, **k):  # a slow disk: the real write, 50 ms late
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        try:
            time.sleep(0.05)
            return real_snapshot(self, *a, **k)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(Store, "snapshot", slow_snapshot)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=1)
    for _ in range(4):
        train_step(net, opt, *data)
    expected = {k: raw(v) for k, v in net.state_dict().items()}
    tracker.close()  # step 4's snapshot is still being written: close must wait for it, not race it
    assert state["most"] == 1 and state["running"] == 0
    assert tracker.stats["writer_stall_seconds"] >= 0.1  # steps 2-4 each waited for the previous write
    assert tracker._writer.store is None  # closed by the thread that owned it
    monkeypatch.undo()
    store = Store.open(store_dir)
    assert [i.step for i in store.list()] == [0, 1, 2, 3, 4]
    snap = store.open_snapshot("latest")
    assert all(snap[k].read() == v for k, v in expected.items())


def test_a_script_that_never_closes_still_gets_its_final_snapshot_at_exit(store_dir):
    script = (
        "import sys, torch, ckptdiff\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(4, 2)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "ckptdiff.track(m, opt, store=sys.argv[1], every=10)  # no with, no close, result not kept\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); m(torch.ones(8, 4)).sum().backward(); opt.step()\n"
        "torch.save(m.state_dict(), sys.argv[1] + '.pt')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, store_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    store = Store.open(store_dir)
    assert [(i.step, i.tag) for i in store.list()] == [(0, "baseline"), (3, None)]
    saved = torch.load(store_dir + ".pt", weights_only=True)
    snap = store.open_snapshot("latest")
    assert all(snap[k].read() == raw(v) for k, v in saved.items())


def test_steps_skipped_by_grad_scaler_are_not_counted(net, data, store_dir, no_warnings):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = data
    with ckptdiff.track(net, opt, store=store_dir, every=2) as tracker:
        for i in range(5):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            if i == 2:
                loss = loss * float("inf")  # an overflow: the scaler skips this optimizer.step()
            before = raw(net.head.weight)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            assert (raw(net.head.weight) == before) == (i == 2)
    assert tracker.current_step == 4
    assert [i.step for i in Store.open(store_dir).list()] == [0, 2, 4]
    assert tracker.drift_events == [] and tracker.errors == []


def test_lora_adapters_that_start_moving_at_step_two_are_not_called_stale(store_dir, no_warnings):
    enc = _lora_encoder()
    enc.train()
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    a_names = [n for n, _ in enc.named_parameters() if n.endswith(".A")]
    with ckptdiff.track(enc, opt, store=store_dir, every=1) as tracker:
        opt.zero_grad()
        enc(x).pow(2).mean().backward()
        # B is zero, so A's first gradient is exactly zero and Adam leaves it bitwise unchanged at step 1.
        assert all(not p.grad.any() for n, p in enc.named_parameters() if n.endswith(".A"))
        opt.step()
        for _ in range(5):
            opt.zero_grad()
            enc(x).pow(2).mean().backward()
            opt.step()
    assert tracker.stale == []
    store = Store.open(store_dir)
    step1, base = store.entries("step:1"), store.entries("baseline")
    assert all(step1[n].hash == base[n].hash for n in a_names)  # unchanged after step 1 indeed
    assert all(store.entries("latest")[n].hash != base[n].hash for n in a_names)
