"""The optimizer audit: the selective fine-tuning mistakes that can be seen before the first step.

Each finding names the tensors and says how to fix them, because the symptoms
show up far from the cause ("the loss does not change", a frozen layer that
moved by 4e-4). The checks:

* ``non-leaf``: the optimizer would hold a tensor computed from another one.
  torch refuses it outright ("can't optimize a non-leaf Tensor"), so this is
  usually found by auditing the list of tensors *before* building the
  optimizer; a non-leaf tensor would never receive a ``.grad`` anyway.
* ``not-a-parameter``: the optimizer holds tensors the model never reads
  (a state_dict copy): the optimizer trains copies, the model stays put.
* ``frozen-in-optimizer``: ``requires_grad=False`` parameters in a param
  group. Adam/AdamW keep moving them when their ``.grad`` is a zero tensor
  rather than None (stale momentum), and weight decay applies regardless.
* ``not-in-optimizer``: ``requires_grad=True`` parameters in no group: they
  get gradients, cost memory, and never change.
* ``frozen-batchnorm-train``: a frozen module's BatchNorm in train mode:
  ``model.train()`` makes its running statistics move whatever
  ``requires_grad`` says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .model import ModelTensors, TrackerError, collect, names_of


@dataclass(frozen=True)
class AuditFinding:
    """One problem: which tensors, why it matters, what to change."""

    code: str
    severity: str  # "error" or "warning"
    tensors: tuple[str, ...]
    message: str
    fix: str

    def __str__(self) -> str:
        return (f"{self.severity}: [{self.code}] {self.message}\n"
                f"    tensors: {names_of(self.tensors)}\n"
                f"    fix: {self.fix}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "tensors": list(self.tensors),
                "message": self.message, "fix": self.fix}


@dataclass
class AuditReport:
    findings: list[AuditFinding] = field(default_factory=list)

    @property
    def errors(self) -> list[AuditFinding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[AuditFinding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def find(self, code: str) -> AuditFinding | None:
        return next((f for f in self.findings if f.code == code), None)

    def __str__(self) -> str:
        if not self.findings:
            return "ckptdiff audit: no problems found"
        head = f"ckptdiff audit: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return "\n".join([head] + [str(f) for f in self.findings])

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "ckptdiff.audit/1", "ok": self.ok, "findings": [f.to_dict() for f in self.findings]}


@dataclass(frozen=True)
class _Held:
    """A tensor the optimizer holds (or is about to), with the best name we can give it."""

    label: str
    tensor: Any
    group: int
    weight_decay: float
    has_state: bool


def _describe(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _held_tensors(optimizer: Any, model_names: dict[int, str]) -> list[_Held] | None:
    """Normalise an optimizer, a list of tensors/param groups, or a name->tensor mapping."""
    import torch

    if optimizer is None:
        return None
    out: list[_Held] = []

    def add(t: Any, label: str | None, g: int, i: int, wd: float, state: Any) -> None:
        if not isinstance(t, torch.Tensor):
            raise TrackerError(f"optimizer param group {g} item {i} is a {type(t).__name__}, not a tensor")
        name = model_names.get(id(t)) or label or f"param_groups[{g}][{i}] ({_describe(t)})"
        has_state = bool(state.get(t)) if state is not None else False
        out.append(_Held(name, t, g, wd, has_state))

    if isinstance(optimizer, torch.optim.Optimizer):
        for g, group in enumerate(optimizer.param_groups):
            for i, t in enumerate(group["params"]):
                add(t, None, g, i, float(group.get("weight_decay", 0.0) or 0.0), optimizer.state)
        return out
    if isinstance(optimizer, Mapping):
        for i, (k, t) in enumerate(optimizer.items()):
            add(t, str(k), 0, i, 0.0, None)
        return out
    if isinstance(optimizer, torch.Tensor):
        optimizer = [optimizer]
    if not isinstance(optimizer, Iterable):
        raise TrackerError(f"cannot audit a {type(optimizer).__name__}: pass a torch.optim.Optimizer, a list of "
                           "tensors or param-group dicts, or a {name: tensor} mapping")
    items = list(optimizer)
    if items and all(isinstance(x, Mapping) for x in items):
        for g, group in enumerate(items):
            params = group.get("params", [])
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for i, t in enumerate(params):
                add(t, None, g, i, float(group.get("weight_decay", 0.0) or 0.0), None)
        return out
    for i, t in enumerate(items):
        if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):  # named_parameters() pairs
            add(t[1], t[0], 0, i, 0.0, None)
        else:
            add(t, None, 0, i, 0.0, None)
    return out


def run_audit(model: Any = None, optimizer: Any = None, *, trainable: Any = None,
              tensors: ModelTensors | None = None) -> AuditReport:
    """Audit ``model`` against what ``optimizer`` holds (either may be None). See the module docstring."""
    import torch

    if model is None and optimizer is None:
        raise TrackerError("audit needs a model, an optimizer (or the tensors you will give it), or both")
    model_names: dict[int, str] = {}
    if tensors is None and model is not None:
        opt_ids = None
        if isinstance(optimizer, torch.optim.Optimizer):
            opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        tensors = collect(model, optimizer_ids=opt_ids, trainable=trainable)
    if tensors is not None:
        for s in tensors.slots:
            model_names.setdefault(id(s.tensor), s.name)
    held = _held_tensors(optimizer, model_names)
    report = AuditReport()
    if held is not None:
        _check_held(report, held, tensors)
    if tensors is not None:
        _check_batchnorm(report, tensors)
    return report


def _check_held(report: AuditReport, held: list[_Held], tensors: ModelTensors | None) -> None:
    non_leaf = [h for h in held if not h.tensor.is_leaf]
    if non_leaf:
        report.findings.append(AuditFinding(
            "non-leaf", "error", tuple(h.label for h in non_leaf),
            f"{len(non_leaf)} tensor(s) for the optimizer are not leaf tensors: they were computed from another "
            "tensor that requires grad (e.g. p.clone(), p.to(device), sd[k].clone().requires_grad_(True) on a "
            "state_dict(keep_vars=True) entry). torch.optim refuses them with \"ValueError: can't optimize a "
            "non-leaf Tensor\", and a non-leaf tensor never gets a .grad, so it could not train anyway",
            "make each one a fresh leaf parameter: torch.nn.Parameter(t.detach().clone()), and put that parameter "
            "in the model (or load the values with model.load_state_dict(sd) and optimize model.parameters())"))
    leaves = [h for h in held if h.tensor.is_leaf]
    if tensors is not None:
        model_ids = {id(s.tensor) for s in tensors.slots if s.kind == "param"}
        foreign = [h for h in leaves if id(h.tensor) not in model_ids]
        if foreign:
            report.findings.append(AuditFinding(
                "not-a-parameter", "warning", tuple(h.label for h in foreign),
                f"{len(foreign)} tensor(s) in the optimizer are not parameters of the model: the optimizer will "
                "update these copies and the model will not change",
                "optimize the model's own parameters: load values with model.load_state_dict(sd), then pass "
                "[p for n, p in model.named_parameters() if <n is trainable>] to the optimizer"))
        leaves = [h for h in leaves if id(h.tensor) in model_ids]
    frozen = [h for h in leaves if not h.tensor.requires_grad]
    if frozen:
        why = []
        if any(h.weight_decay for h in frozen):
            why.append("their param group has weight_decay > 0")
        stateful = [h.label for h in frozen if h.has_state]
        if stateful:
            why.append(f"the optimizer already holds momentum state for {names_of(stateful, 4)}")
        detail = f" ({'; '.join(why)})" if why else ""
        report.findings.append(AuditFinding(
            "frozen-in-optimizer", "warning", tuple(h.label for h in frozen),
            f"{len(frozen)} parameter(s) with requires_grad=False are in the optimizer{detail}: Adam/AdamW/SGD "
            "with momentum keep moving a parameter whose .grad is a zero tensor instead of None, and some "
            "optimizers apply weight decay even without a gradient, so these 'frozen' weights can drift",
            "build the optimizer from trainable parameters only: "
            "torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], ...), and use "
            "optimizer.zero_grad(set_to_none=True)"))
    if tensors is not None:
        held_ids = {id(h.tensor) for h in held}
        orphans = [n for s in tensors.slots if s.kind == "param" and s.tensor.requires_grad
                   and id(s.tensor) not in held_ids for n in s.names[:1]]
        if orphans:
            report.findings.append(AuditFinding(
                "not-in-optimizer", "warning", tuple(orphans),
                f"{len(orphans)} parameter(s) have requires_grad=True but are in no optimizer param group: they "
                "receive gradients (and use memory for them) but never change, which looks like 'the loss does "
                "not go down'",
                "add them to the optimizer (optimizer.add_param_group({'params': [...]}) or rebuild it), or "
                "freeze them with p.requires_grad_(False)"))


def _check_batchnorm(report: AuditReport, tensors: ModelTensors) -> None:
    from torch.nn.modules.batchnorm import _NormBase

    hits: list[str] = []
    modules: list[str] = []
    for qual, sub in tensors.module.named_modules():
        if not isinstance(sub, _NormBase) or not sub.training or not sub.track_running_stats:
            continue
        prefix = f"{qual}." if qual else ""
        names = [prefix + b for b, t in sub._buffers.items() if t is not None]
        slots = [tensors.by_name[n] for n in names if n in tensors.by_name]
        if slots and all(s.role == "frozen" for s in slots):
            hits.extend(names)
            modules.append(qual or "<root>")
    if hits:
        report.findings.append(AuditFinding(
            "frozen-batchnorm-train", "warning", tuple(hits),
            f"{len(modules)} BatchNorm module(s) in frozen parts of the model are in train mode "
            f"({names_of(modules, 4)}): model.train() makes their running_mean/running_var move on every forward "
            "pass whatever requires_grad says",
            "put frozen norm layers in eval mode after every model.train(), e.g. "
            "`model.train(); model.backbone.eval()` (or construct them with track_running_stats=False)"))


__all__ = ["AuditFinding", "AuditReport", "run_audit"]
