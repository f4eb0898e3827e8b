"""Real torch selective fine-tunes: the engine names exactly the tensors that drifted or went stale.

Each test trains a small model for a few steps on CPU, snapshots
``state_dict()`` before and after (as numpy, bf16 through ml_dtypes), and diffs
the snapshots against a manifest that says only the head is trainable.
"""

from __future__ import annotations

import json

import ml_dtypes
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ckptdiff import Checkpoint, Manifest  # noqa: E402
from ckptdiff import diff  # noqa: E402

MANIFEST = Manifest(trainable=("head.*",), source="test manifest")
BACKBONE_PARAMS = {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
                   "backbone.3.weight", "backbone.3.bias"}
BN_STATS = {"backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def make(dtype=torch.float32):
    torch.manual_seed(0)
    model = Net().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g).to(dtype)
    y = torch.randint(0, 3, (64,), generator=g)
    return model, x, y


def step(model, opt, x, y, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()


def to_numpy(t):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()


def snapshot(model) -> Checkpoint:
    return Checkpoint.from_arrays({k: to_numpy(v) for k, v in model.state_dict().items()})


def freeze_backbone(model):
    for p in model.backbone.parameters():
        p.requires_grad_(False)


def test_clean_finetune_no_drift_no_stale():
    model, x, y = make()
    freeze_backbone(model)
    before = snapshot(model)
    model.train()
    model.backbone.eval()  # frozen backbone: BatchNorm uses, and keeps, its running stats
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(5):
        step(model, opt, x, y)
    rep = diff(before, snapshot(model), manifest=MANIFEST)
    assert rep.drifted == [] and rep.stale == []
    assert {t.name for t in rep.tensors if t.status == "changed"} == {"head.weight", "head.bias"}
    assert rep.exit_code == 0


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_steps_frozen_params_with_zero_grads(opt_cls, dtype):
    model, x, y = make(dtype)
    opt = opt_cls(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):  # phase 1: everything trains, Adam builds momentum
        step(model, opt, x, y, set_to_none=False)
    freeze_backbone(model)  # phase 2: "frozen", but still in the optimizer with zero (not None) grads
    model.backbone.eval()
    before = snapshot(model)
    torch_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        step(model, opt, x, y, set_to_none=False)
    rep = diff(before, snapshot(model), manifest=MANIFEST)
    assert {t.name for t in rep.drifted} == BACKBONE_PARAMS
    assert rep.stale == [] and rep.exit_code == 1
    # the numbers are the real ones, in float64
    after = model.state_dict()
    for name in BACKBONE_PARAMS | {"head.weight"}:
        t = next(t for t in rep.tensors if t.name == name)
        d = (after[name].double() - torch_before[name].double()).abs()
        assert t.max_abs_delta == pytest.approx(d.max().item(), rel=1e-12)
        assert t.mean_abs_delta == pytest.approx(d.mean().item(), rel=1e-9)
        assert t.rel_l2 == pytest.approx((d.norm() / torch_before[name].double().norm()).item(), rel=1e-9)
        assert t.changed_elements == int((after[name].view(-1) != torch_before[name].view(-1)).sum())
        assert t.dtype_old == ("bfloat16" if dtype == torch.bfloat16 else "float32")


def test_set_to_none_leaves_frozen_params_alone():
    """The control for the test above: with grads set to None, Adam skips the frozen params."""
    model, x, y = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        step(model, opt, x, y, set_to_none=True)
    freeze_backbone(model)
    model.backbone.eval()
    before = snapshot(model)
    for _ in range(3):
        step(model, opt, x, y, set_to_none=True)
    rep = diff(before, snapshot(model), manifest=MANIFEST)
    assert rep.drifted == [] and rep.stale == []


def test_batchnorm_running_stats_move_in_train_mode():
    model, x, y = make()
    freeze_backbone(model)
    before = snapshot(model)
    model.train()  # the bug: the frozen backbone's BatchNorm is still in train mode
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    for _ in range(4):
        step(model, opt, x, y)
    rep = diff(before, snapshot(model), manifest=MANIFEST)
    assert {t.name for t in rep.drifted} == BN_STATS
    nbt = next(t for t in rep.tensors if t.name == "backbone.1.num_batches_tracked")
    assert nbt.max_abs_delta == 4.0
    # declared as buffers, the same stats are allowed to move
    rep = diff(before, snapshot(model), manifest=Manifest(trainable=("head.*",), buffers=("*.running_*", "*.num_batches_tracked")))
    assert rep.drifted == []


def test_trainable_param_left_out_of_the_optimizer_is_stale():
    model, x, y = make()
    freeze_backbone(model)
    model.train()
    model.backbone.eval()
    before = snapshot(model)
    opt = torch.optim.SGD([model.head.weight], lr=0.1)  # head.bias forgotten, though requires_grad=True
    for _ in range(3):
        step(model, opt, x, y)
    assert model.head.bias.grad is not None and model.head.bias.grad.abs().sum() > 0
    rep = diff(before, snapshot(model), manifest=MANIFEST)
    assert [t.name for t in rep.stale] == ["head.bias"] and rep.drifted == []
    assert rep.exit_code == 0  # stale is a warning, not a policy failure


def test_drift_from_real_pt_files_with_embedded_trainable_keys(tmp_path, capsys):
    """Through files on disk: torch.save'd training checkpoints, manifest embedded as trainable_keys."""
    model, x, y = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model.train()
    for _ in range(2):
        step(model, opt, x, y, set_to_none=False)
    freeze_backbone(model)
    model.backbone.eval()
    keys = [k for k, p in model.named_parameters() if p.requires_grad]
    torch.save({"state_dict": model.state_dict(), "trainable_keys": keys}, tmp_path / "before.pt")
    for _ in range(2):
        step(model, opt, x, y, set_to_none=False)
    torch.save({"state_dict": model.state_dict(), "trainable_keys": keys}, tmp_path / "after.pt")

    rep = diff(str(tmp_path / "before.pt"), str(tmp_path / "after.pt"))
    assert rep.manifest_source is not None and rep.old.format == "torch"
    assert {t.name for t in rep.drifted} == BACKBONE_PARAMS

    from ckptdiff.cli import main
    rc = main(["diff", str(tmp_path / "before.pt"), str(tmp_path / "after.pt"), "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["summary"]["drifted"] == len(BACKBONE_PARAMS)
    assert {t["name"] for t in data["tensors"] if t["drift"]} == BACKBONE_PARAMS
