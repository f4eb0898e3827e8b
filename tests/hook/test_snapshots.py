"""Snapshots from the hook: baseline + manifest, periodic trainable-only writes, metrics, resume, failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from hook_helpers import Net, freeze, raw, train_step

import ckptdiff
from ckptdiff.hook import StaleWarning, StoreWarning, TrackerError
from ckptdiff.hook.writer import BackgroundWriter
from ckptdiff.store import Store
from ckptdiff.store.blobs import TMP_DIR

torch = pytest.importorskip("torch")


def _selective(net):
    freeze(net.backbone)
    net.backbone.eval()
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)


def test_baseline_is_full_with_the_derived_manifest(net, store_dir):
    opt = _selective(net)
    with ckptdiff.track(net, opt, store=store_dir) as tracker:
        pass
    store = Store.open(store_dir)
    (info,) = store.list()
    assert info.tag == "baseline" and info.step == 0 and info.source == "hook"
    snap = store.open_snapshot("baseline")
    assert list(snap) == list(net.state_dict())
    for name, t in net.state_dict().items():
        assert snap[name].read() == raw(t), name
    m = store.effective_manifest("baseline")
    assert m.trainable == ("head.weight", "head.bias")
    assert m.role("backbone.0.weight") == "frozen"
    assert m.role("backbone.1.running_mean") == "frozen"  # buffer of a frozen module
    assert m.buffers == ()
    assert tracker.manifest == m


def test_buffers_of_trained_modules_get_the_buffer_role(net, store_dir):
    freeze(net.backbone[0])
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with ckptdiff.track(net, opt, store=store_dir) as tracker:
        pass
    assert tracker.manifest.buffers == ("backbone.1.running_mean", "backbone.1.running_var",
                                        "backbone.1.num_batches_tracked")
    assert tracker.manifest.frozen == ("backbone.0.weight", "backbone.0.bias")


def test_trainable_patterns_override_the_optimizer(net, store_dir):
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    net.eval()
    with ckptdiff.track(net, opt, store=store_dir, trainable=["head.*", "backbone.3.*"]) as tracker:
        pass
    assert tracker.manifest.trainable == ("backbone.3.weight", "backbone.3.bias", "head.weight", "head.bias")
    with pytest.raises(TrackerError, match="matches no tensor"):
        ckptdiff.track(net, opt, store=store_dir, trainable="classifier.*")


def test_periodic_snapshots_write_trainable_and_changed_tensors_only(net, data, store_dir):
    x, y = data
    opt = _selective(net)
    expected = {}
    with ckptdiff.track(net, opt, store=store_dir, every=3) as tracker:
        for step in range(1, 8):
            loss = train_step(net, opt, x, y)
            tracker.log(loss=loss, lr=opt.param_groups[0]["lr"])
            if step % 3 == 0:
                expected[step] = ({n: raw(t) for n, t in net.state_dict().items()}, loss)
        assert tracker.stats["staging_bytes"] == sum(p.numel() * 4 for p in net.head.parameters())
    store = Store.open(store_dir)
    infos = store.list()
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (3, None), (6, None), (7, None)]
    assert infos[-1].message == "final snapshot at close"
    base = store.entries("baseline")
    for info in infos[1:3]:
        snap = store.open_snapshot(info.id)
        want, loss = expected[info.step]
        for name, b in want.items():
            assert snap[name].read() == b, (info.step, name)
        entries = store.entries(info.id)
        for name, e in entries.items():
            assert (e.hash == base[name].hash) == name.startswith("backbone"), name
        assert info.metrics["loss"] == pytest.approx(loss, rel=1e-6)
        assert info.metrics["lr"] == 1e-2
        assert info.parent == infos[infos.index(info) - 1].id
    # The last log() came after step 6's snapshot, so it is attached to the final one.
    assert "loss" in infos[-1].metrics


def test_on_demand_snapshot_and_no_optimizer_mode(net, data, store_dir):
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    tracker = ckptdiff.track(net, store=store_dir, every=100)
    manual = torch.optim.SGD(net.head.parameters(), lr=0.1)
    for _ in range(2):
        train_step(net, manual, x, y)
        tracker.step()
    assert tracker.current_step == 2
    sid = tracker.snapshot(tag="best", message="lowest loss so far", wait=True)
    tracker.close()
    store = Store.open(store_dir)
    info = store.resolve("best")
    assert info.id == sid and info.step == 2 and info.message == "lowest loss so far"
    assert store.open_snapshot("best")["head.weight"].read() == raw(net.head.weight)
    assert [i.tag for i in store.list()] == ["baseline", "best"]  # nothing new after: no final snapshot
    with pytest.raises(TrackerError, match="closed"):
        tracker.snapshot()


def test_step_is_counted_by_the_optimizer_hook(net, data, store_dir):
    opt = _selective(net)
    with ckptdiff.track(net, opt, store=store_dir) as tracker:
        train_step(net, opt, *data)
        assert tracker.current_step == 1
        with pytest.raises(TrackerError, match="optimizer.step"):
            tracker.step()
    train_step(net, opt, *data)  # detached after close: the hook no longer fires
    assert tracker.current_step == 1


def test_resume_appends_to_the_same_history(net, data, store_dir):
    x, y = data
    opt = _selective(net)
    with ckptdiff.track(net, opt, store=store_dir, every=2):
        for _ in range(4):
            train_step(net, opt, x, y)
    first = Store.open(store_dir).list()
    assert [(i.step, i.tag) for i in first] == [(0, "baseline"), (2, None), (4, None)]
    # A new process: a fresh model loaded from the last snapshot, a new optimizer, the same store.
    torch.manual_seed(1)
    net2 = Net()
    with Store.open(store_dir).open_snapshot("latest") as snap:
        net2.load_state_dict({n: torch.from_numpy(snap[n].numpy().copy()) for n in snap})
    opt2 = _selective(net2)
    with ckptdiff.track(net2, opt2, store=store_dir, every=2) as tracker:
        assert tracker.resumed and tracker.current_step == 4
        for _ in range(2):
            train_step(net2, opt2, x, y)
    infos = Store.open(store_dir).list()
    assert [i.id for i in infos[:3]] == [i.id for i in first]
    assert [(i.step, i.tag) for i in infos[3:]] == [(4, "baseline"), (6, None)]
    assert infos[3].parent == first[-1].id and "resumed" in infos[3].message
    # The resumed baseline deduplicates against the history: same bytes, same blobs.
    store = Store.open(store_dir)
    assert store.entries(infos[3].id)["head.weight"].hash == store.entries(first[-1].id)["head.weight"].hash


def test_a_store_that_fails_mid_run_does_not_stop_training(net, data, store_dir):
    x, y = data
    opt = _selective(net)
    tmp_dir = os.path.join(store_dir, TMP_DIR)  # where the store stages blobs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ckptdiff.track(net, opt, store=store_dir, every=2)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        with open(tmp_dir, "w") as f:  # blobs can no longer be staged: every write fails
            f.write("not a directory")
        for _ in range(4):
            train_step(net, opt, x, y)
        tracker.flush()
        assert len(tracker.errors) == 2
        assert all("writing the snapshot at step" in e for e in tracker.errors)
        os.remove(tmp_dir)  # the disk recovers
        for _ in range(2):
            train_step(net, opt, x, y)
        tracker.close()
    # One warning for the streak of failures (not one per snapshot), one summary at close.
    store_warnings = [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]
    assert len(store_warnings) == 2
    assert "at step 2:" in store_warnings[0] and "training continues" in store_warnings[0]
    assert "2 store failure(s) in this run, 1 of them not warned about" in store_warnings[1]
    store = Store.open(store_dir)
    assert [(i.step, i.tag) for i in store.list()] == [(0, "baseline"), (6, None)]
    snap = store.open_snapshot("latest")
    for name, t in net.state_dict().items():
        assert snap[name].read() == raw(t), name


def test_on_store_error_raise(net, data, store_dir):
    opt = _selective(net)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=1, on_store_error="raise")
    tmp_dir = os.path.join(store_dir, TMP_DIR)  # where the store stages blobs
    shutil.rmtree(tmp_dir, ignore_errors=True)
    open(tmp_dir, "w").close()
    train_step(net, opt, *data)
    with pytest.raises(ckptdiff.CkptError, match="snapshot store failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker.flush()
    os.remove(tmp_dir)
    tracker.close()


def test_unopenable_store_fails_at_attach(net, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(TrackerError, match="cannot open the snapshot store"):
        ckptdiff.track(net, store=str(target))


def test_stale_trainable_tensors_are_reported(net, data, store_dir):
    x, y = data
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD([{"params": [net.head.weight], "lr": 0.1}, {"params": [net.head.bias], "lr": 0.0}])
    with pytest.warns(StaleWarning, match="still bitwise equal to the baseline at step 6: head.bias;"):
        with ckptdiff.track(net, opt, store=store_dir, every=2) as tracker:
            for _ in range(4):
                train_step(net, opt, x, y)
            tracker.flush()
            assert tracker.stale == []  # not before 5 updates: a zero-init chain may start late
            for _ in range(2):
                train_step(net, opt, x, y)
            tracker.flush()
            train_step(net, opt, x, y)  # warnings surface on the training thread
    assert tracker.stale == ["head.bias"]


def test_tied_weights_are_one_tensor_under_two_names(store_dir):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    torch.manual_seed(0)
    m = Tied()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with ckptdiff.track(m, opt, store=store_dir, every=1) as tracker:
        loss = torch.nn.functional.cross_entropy(m(torch.arange(10)), torch.arange(10))
        loss.backward()
        opt.step()
    assert tracker.manifest.trainable == ("emb.weight", "out.weight")
    e = Store.open(store_dir).entries("latest")
    assert e["emb.weight"].hash == e["out.weight"].hash


def test_ddp_and_dataparallel_names_have_no_module_prefix(net, data, store_dir, tmp_path):
    import torch.distributed as dist

    x, y = data
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        freeze(net.backbone)
        net.backbone.eval()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        with ckptdiff.track(ddp, opt, store=store_dir, every=1) as tracker:
            train_step(ddp, opt, x, y)
        assert tracker.manifest.trainable == ("head.weight", "head.bias")
        assert tracker.drift_events == []
        snap = Store.open(store_dir).open_snapshot("latest")
        assert list(snap) == list(net.state_dict())
        assert snap["head.weight"].read() == raw(net.head.weight)
    finally:
        dist.destroy_process_group()
    dp = torch.nn.DataParallel(Net())
    with ckptdiff.track(dp, store=str(tmp_path / "dp")) as tracker:
        pass
    assert all(not n.startswith("module.") for n in tracker.manifest.frozen + tracker.manifest.trainable)


def test_unsupported_models_fail_clearly_at_attach(store_dir):
    m = torch.nn.Linear(2, 2)
    m.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TrackerError, match="phase.*complex64"):
        ckptdiff.track(m, store=store_dir)
    with pytest.raises(TrackerError, match="meta device"):
        ckptdiff.track(torch.nn.Linear(2, 2, device="meta"), store=store_dir)
    with pytest.raises(TrackerError, match="torch.nn.Module"):
        ckptdiff.track({"w": torch.zeros(2)}, store=store_dir)
    with pytest.raises(TrackerError, match="no parameters or buffers"):
        ckptdiff.track(torch.nn.ReLU(), store=store_dir)
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(TrackerError, match="every"):
        ckptdiff.track(lin, store=store_dir, every=0)
    with pytest.raises(TrackerError, match="on_drift"):
        ckptdiff.track(lin, store=store_dir, on_drift="explode")
    with pytest.raises(TrackerError, match="torch.optim.Optimizer"):
        ckptdiff.track(lin, [lin.weight], store=store_dir)
    assert not os.path.exists(store_dir)  # nothing was created for a refused attach


def test_writer_keeps_at_most_one_job_in_flight():
    release = threading.Event()
    started = []
    writer = BackgroundWriter(lambda: "store")
    try:
        first = writer.submit(lambda s: (started.append(1), release.wait(10), s)[-1], "first")
        order = []

        def second_submit():
            job = writer.submit(lambda s: started.append(2), "second")
            order.append("second submitted")
            job.wait()

        t = threading.Thread(target=second_submit)
        t.start()
        t.join(0.3)
        assert order == [] and t.is_alive()  # blocked behind the first job: backpressure, no queue
        release.set()
        assert first.wait(10) == "store"
        t.join(10)
        assert order == ["second submitted"] and started == [1, 2]
        failing = writer.submit(lambda s: 1 / 0, "boom")
        with pytest.raises(ZeroDivisionError):
            failing.wait(10)
        assert writer.call(lambda s: s + "!", "after") == "store!"  # the thread survived
    finally:
        release.set()
        writer.close()


def test_import_ckptdiff_does_not_import_torch():
    code = "import sys, ckptdiff; ckptdiff.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_accept_scalar_tensors_and_reject_others(net, store_dir):
    with ckptdiff.track(net, store=store_dir) as tracker:
        tracker.log(step=7, loss=torch.tensor(0.25, requires_grad=True) * 2, note="warmup")
        with pytest.raises(TrackerError, match="scalar"):
            tracker.log(bad=torch.zeros(3))
        tracker.step()
        tracker.snapshot(wait=True)
    info = Store.open(store_dir).resolve("latest")
    assert info.metrics == {"loss": 0.5, "note": "warmup", "metrics_step": 7}


def test_bfloat16_snapshot_bytes_round_trip(store_dir):
    torch.manual_seed(0)
    net = Net(torch.bfloat16)
    with ckptdiff.track(net, store=store_dir):
        pass
    snap = Store.open(store_dir).open_snapshot("baseline")
    assert snap["head.weight"].dtype == "bfloat16"
    np.testing.assert_array_equal(snap["head.weight"].numpy().astype(np.float32),
                                  net.head.weight.detach().float().numpy())
    assert snap["backbone.1.num_batches_tracked"].dtype == "int64"


def test_optimizer_wrappers_are_unwrapped(net, data, store_dir):
    class Accumulating(torch.optim.Optimizer):
        """Like accelerate's AcceleratedOptimizer: steps the inner optimizer every other call."""

        def __init__(self, inner):  # noqa: D107 - deliberately skips Optimizer.__init__, as wrappers do
            self.optimizer = inner
            self.calls = 0

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def zero_grad(self, set_to_none=True):
            if self.calls % 2 == 0:
                self.optimizer.zero_grad(set_to_none=set_to_none)

        def step(self, closure=None):
            self.calls += 1
            if self.calls % 2 == 0:
                self.optimizer.step()

    opt = Accumulating(_selective(net))
    with ckptdiff.track(net, opt, store=store_dir, every=2) as tracker:
        for _ in range(4):
            train_step(net, opt, *data)
        assert tracker.current_step == 2 and tracker.optimizer is opt.optimizer
    assert [i.step for i in Store.open(store_dir).list()] == [0, 2]


def test_drift_is_still_reported_when_the_store_cannot_record_it(net, data, store_dir):
    x, y = data
    opt = _selective(net)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=100, on_drift="record")
    tmp_dir = os.path.join(store_dir, TMP_DIR)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    open(tmp_dir, "w").close()
    with torch.no_grad():
        net.backbone[3].weight[0, 0, 0] += 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(net, opt, x, y)
    (e,) = tracker.drift_events
    assert e.name == "backbone.3.weight" and e.step == 1
    assert e.confirmed and e.changed == 1 and e.max_abs_delta == pytest.approx(1.0, rel=1e-6)
    assert e.snapshot is None  # measured against the baseline, but the drift snapshot could not be written
    assert any("drift snapshot" in err for err in tracker.errors)
    assert any(w.category is StoreWarning for w in caught)
    os.remove(tmp_dir)
    tracker.close()
