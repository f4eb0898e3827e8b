"""The CUDA paths (pinned side-stream copies, deferred checksum reads); skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from hook_helpers import Net, freeze, make_data, raw, train_step

import ckptdiff
from ckptdiff.store import Store

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::ckptdiff.hook.AuditWarning")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_snapshots_and_deferred_drift(dtype, store_dir):
    torch.manual_seed(0)
    net = Net(dtype).cuda()
    x, y = (t.cuda() for t in make_data(dtype=dtype))
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    tracker = ckptdiff.track(net, opt, store=store_dir, every=2, on_drift="record")
    assert tracker._drift.defer  # no host sync in the check on CUDA
    before = net.backbone[0].bias.detach().double().cpu().numpy()
    for step in range(1, 7):
        if step == 3:
            with torch.no_grad():
                net.backbone[0].bias.add_(0.25)
        train_step(net, opt, x, y)
    tracker.close()
    (e,) = tracker.drift_events
    assert e.name == "backbone.0.bias" and e.step == 3
    after = net.backbone[0].bias.detach().double().cpu().numpy()
    assert e.max_abs_delta == float(np.abs(after - before).max())
    store = Store.open(store_dir)
    assert [(i.step, i.tag) for i in store.list()] == [(0, "baseline"), (2, None), (3, "drift"), (4, None),
                                                       (6, None)]
    snap = store.open_snapshot("latest")
    for name, t in net.state_dict().items():
        assert snap[name].read() == raw(t.cpu()), name
    assert tracker.stats["staging_bytes"] > 0


def test_cuda_raise_reads_the_check_at_once(store_dir):
    torch.manual_seed(0)
    net = Net().cuda()
    x, y = (t.cuda() for t in make_data())
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.AdamW(net.head.parameters(), lr=1e-3)
    with pytest.raises(ckptdiff.FrozenDriftError) as err:
        with ckptdiff.track(net, opt, store=store_dir, on_drift="raise"):
            for step in range(1, 5):
                if step == 2:
                    with torch.no_grad():
                        net.backbone[3].weight.mul_(1.001)
                train_step(net, opt, x, y)
    assert err.value.step == 2
