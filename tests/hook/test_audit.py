"""The attach-time audit: each classic selective fine-tuning mistake, named with its tensors and fix."""

from __future__ import annotations

import warnings

import pytest
from hook_helpers import Net, freeze, make_data, train_step

import ckptdiff
from ckptdiff.hook import AuditWarning, TrackerError

torch = pytest.importorskip("torch")


def _clean(net):
    freeze(net.backbone)
    net.backbone.eval()
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)


def test_clean_selective_setup_has_no_findings(net):
    opt = _clean(net)
    report = ckptdiff.audit(net, opt)
    assert report.findings == []
    assert report.ok
    assert "no problems" in str(report)


def test_non_leaf_tensors_are_named_with_the_fix_before_the_optimizer_refuses_them(net):
    # The field bug: trainable tensors rebuilt from a state_dict that still carries autograd history.
    sd = net.state_dict(keep_vars=True)
    wanted = {k: sd[k].clone().requires_grad_(True) for k in ("head.weight", "head.bias")}
    # torch itself refuses them, with a message that does not say which tensor or how to fix it ...
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        torch.optim.AdamW(list(wanted.values()), lr=1e-3)
    # ... so the audit runs on what the user is about to pass.
    report = ckptdiff.audit(net, wanted)
    f = report.find("non-leaf")
    assert f is not None and f.severity == "error" and not report.ok
    assert f.tensors == ("head.weight", "head.bias")
    assert "can't optimize a non-leaf Tensor" in f.message
    assert "torch.nn.Parameter(t.detach().clone())" in f.fix
    # Without a model the labels are the mapping's keys too; a plain list gets positional labels.
    assert ckptdiff.audit(None, wanted).find("non-leaf").tensors == ("head.weight", "head.bias")
    listed = ckptdiff.audit(None, list(wanted.values())).find("non-leaf")
    assert listed.tensors[0].startswith("param_groups[0][0] ((4, 128) float32")


def test_the_suggested_fix_gives_leaves_and_says_they_are_not_the_models_parameters(net):
    sd = net.state_dict()
    fixed = {k: torch.nn.Parameter(sd[k].detach().clone()) for k in ("head.weight", "head.bias")}
    torch.optim.AdamW(list(fixed.values()), lr=1e-3)  # torch accepts them now
    report = ckptdiff.audit(net, fixed)
    assert report.find("non-leaf") is None
    f = report.find("not-a-parameter")
    assert f is not None and f.tensors == ("head.weight", "head.bias")
    assert "model will not change" in f.message


def test_non_leaf_smuggled_into_an_optimizer_fails_at_attach(net, store_dir):
    opt = _clean(net)
    opt.param_groups[0]["params"].append(net.head.weight * 2)  # past torch's own check
    with pytest.raises(TrackerError, match="non-leaf"):
        ckptdiff.track(net, opt, store=store_dir)


def test_frozen_parameters_left_in_the_optimizer(net):
    x, y = make_data()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    train_step(net, opt, x, y)
    freeze(net.backbone)
    report = ckptdiff.audit(net, opt)
    f = report.find("frozen-in-optimizer")
    assert f is not None and f.severity == "warning"
    assert set(f.tensors) == {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
                              "backbone.3.weight", "backbone.3.bias"}
    assert "weight_decay > 0" in f.message and "momentum state" in f.message
    assert "p.requires_grad" in f.fix


def test_trainable_parameters_missing_from_the_optimizer(net):
    freeze(net.backbone)
    net.backbone.eval()
    opt = torch.optim.SGD([net.head.weight], lr=0.1)  # forgot the bias
    f = ckptdiff.audit(net, opt).find("not-in-optimizer")
    assert f is not None and f.tensors == ("head.bias",)
    assert "never change" in f.message


def test_frozen_batchnorm_in_train_mode(net):
    freeze(net.backbone)
    opt = torch.optim.AdamW(net.head.parameters(), lr=1e-3)
    net.train()
    f = ckptdiff.audit(net, opt).find("frozen-batchnorm-train")
    assert f is not None
    assert f.tensors == ("backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked")
    assert ".eval()" in f.fix
    net.backbone.eval()
    assert ckptdiff.audit(net, opt).find("frozen-batchnorm-train") is None


def test_batchnorm_of_a_trained_module_is_not_a_finding(net):
    freeze(net.backbone[3])  # the BN module's own parameters still train
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    assert ckptdiff.audit(net, opt).findings == []


def test_track_emits_the_findings_as_warnings(net, store_dir):
    freeze(net.backbone)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ckptdiff.track(net, opt, store=store_dir) as tracker:
            pass
    texts = [str(w.message) for w in caught if issubclass(w.category, AuditWarning)]
    assert any("[frozen-in-optimizer]" in t for t in texts)
    assert any("[frozen-batchnorm-train]" in t for t in texts)
    assert tracker.audit_report.codes() == ["frozen-in-optimizer", "frozen-batchnorm-train"]


def test_report_serialises(net):
    freeze(net.backbone)
    report = ckptdiff.audit(net, torch.optim.SGD(net.parameters(), lr=0.1))
    d = report.to_dict()
    assert d["schema"] == "ckptdiff.audit/1" and d["ok"] is True
    assert [f["code"] for f in d["findings"]] == report.codes()


def test_audit_needs_something_and_rejects_non_tensors():
    with pytest.raises(TrackerError):
        ckptdiff.audit()
    with pytest.raises(TrackerError, match="not a tensor"):
        ckptdiff.audit(None, [1.0, 2.0])
    with pytest.raises(TrackerError, match="torch.nn.Module"):
        ckptdiff.audit(object(), [])


def test_param_group_dicts_and_named_pairs(net):
    freeze(net.backbone)
    groups = [{"params": list(net.head.parameters()), "weight_decay": 0.0},
              {"params": [net.backbone[0].weight], "weight_decay": 0.1}]
    f = ckptdiff.audit(net, groups).find("frozen-in-optimizer")
    assert f.tensors == ("backbone.0.weight",) and "weight_decay > 0" in f.message
    pairs = [(n, p) for n, p in net.named_parameters() if n.startswith("head")]
    report = ckptdiff.audit(Net(), pairs)  # a different model: the pairs are not its parameters
    assert report.find("not-a-parameter").tensors == ("head.weight", "head.bias")
