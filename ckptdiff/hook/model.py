"""The live model as the hook sees it: named tensors, their roles, and what cannot be tracked.

Names are the ``state_dict`` names of the *unwrapped* model (no ``module.``
prefix from DistributedDataParallel / DataParallel, no ``_orig_mod.`` from
``torch.compile``), so a snapshot diffs cleanly against a checkpoint saved
with ``model.module.state_dict()`` or loaded into a fresh model.

Roles follow :mod:`ckptdiff.manifest`: ``trainable`` parameters are the ones
the optimizer will actually update (``requires_grad=True`` *and* in a param
group), or the ``trainable=`` patterns when given; every other parameter is
``frozen``. A buffer (BatchNorm running stats, ``num_batches_tracked``) is a
``buffer`` (allowed to move) when the module that owns it trains, and
``frozen`` when that module's parameters are all frozen, because then a moving
running mean is exactly the drift users do not expect.

torch is imported lazily: this module is only loaded by the hook.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..errors import CkptError, FormatError
from ..manifest import Manifest

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TrackerError(CkptError, ValueError):
    """The model, optimizer or arguments cannot be tracked; raised at attach time."""


@dataclass(eq=False)
class Slot:
    """One distinct tensor of the model (tied weights share a slot under several names).

    For a DTensor (an FSDP2 parameter) ``tensor`` is the DTensor, whose
    version counter moves with every in-place update, and ``local`` is this
    rank's shard, which is what the drift check reads (its own version
    counter does not move when the optimizer updates the DTensor). For any
    other tensor both are the same object.
    """

    names: list[str]
    tensor: torch.Tensor
    kind: str  # "param" or "buffer"
    role: str = "frozen"  # "trainable", "frozen" or "buffer"
    dtype: str = ""
    local: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.local = local_of(self.tensor)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def sharded(self) -> bool:
        """A DTensor: snapshots need every rank to gather it (``full_tensor()``)."""
        return self.local is not self.tensor

    @property
    def nbytes(self) -> int:
        """Bytes held on this rank (the local shard of a DTensor)."""
        return self.local.numel() * self.local.element_size()

    def stamp(self) -> tuple[int, int]:
        """(version, storage address): what moves when the tensor is written or replaced, read in O(1)."""
        return self.tensor._version, self.local.data_ptr()

    def replace(self, tensor: torch.Tensor) -> None:
        """The model points at a new tensor object under this slot's name."""
        self.dtype = _check_tensor(self.name, tensor)
        self.tensor = tensor
        self.local = local_of(tensor)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def local_of(t: Any) -> Any:
    """This rank's part of ``t``: a DTensor's local shard, else ``t`` itself."""
    if _is_dtensor(t):
        import torch

        with torch.no_grad():
            return t.to_local()
    return t


@dataclass(eq=False)
class ModelTensors:
    """Every tensor the hook tracks, deduplicated by identity, in state_dict order."""

    module: Any  # the unwrapped torch.nn.Module
    slots: list[Slot] = field(default_factory=list)
    by_name: dict[str, Slot] = field(default_factory=dict)
    #: state_dict name -> owning module's qualified name (for buffer roles, BN findings).
    owner: dict[str, str] = field(default_factory=dict)

    def role_slots(self, role: str) -> list[Slot]:
        return [s for s in self.slots if s.role == role]

    def manifest(self) -> Manifest:
        buckets: dict[str, list[str]] = {"trainable": [], "frozen": [], "buffer": []}
        for s in self.slots:
            buckets[s.role].extend(s.names)
        return Manifest(tuple(buckets["trainable"]), tuple(buckets["frozen"]), tuple(buckets["buffer"]),
                        source="hook")

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    def refresh(self) -> None:
        """Follow tensors the model replaced since attach (``module.weight = nn.Parameter(...)``).

        The per-step check watches tensor objects; a module attribute pointed
        at a new object is only seen here, once per snapshot (one state_dict
        walk, ~1 ms for hundreds of tensors). The new object's different
        storage makes it a suspect, so a frozen one is checksummed at the next
        check and reported if its values differ from the baseline.
        """
        import torch

        current = self.module.state_dict(keep_vars=True)
        for slot in self.slots:
            t = current.get(slot.name)
            if isinstance(t, torch.Tensor) and t is not slot.tensor:
                slot.replace(t)


def unwrap(model: Any) -> Any:
    """The module whose state_dict names users see: strips DDP/DataParallel/torch.compile wrappers."""
    import torch

    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
            continue
        orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, torch.nn.Module):
            model = orig
            continue
        break
    return model


def _refuse_sharded(module: Any) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except Exception:  # pragma: no cover - builds without distributed
        FSDP = None  # noqa: N806
    if FSDP is not None:
        for name, sub in module.named_modules():
            if isinstance(sub, FSDP):
                raise TrackerError(
                    f"module {name or '<root>'!r} is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
                    "parameters hide the tensors' names and shapes; shard it with "
                    "torch.distributed.fsdp.fully_shard (FSDP2) instead, which the hook tracks on every rank")


def _check_tensor(name: str, t: Any) -> str:
    """Canonical dtype name of a trackable tensor, or a TrackerError saying why it is not."""
    import torch

    t = local_of(t)  # a DTensor is as trackable as its local shard (snapshots gather it whole)
    if t.is_meta:
        raise TrackerError(f"tensor {name!r} is on the meta device (no data yet); attach the hook after the "
                           "weights are materialised (e.g. after load_state_dict(..., assign=True) or to_empty())")
    if t.layout != torch.strided:
        raise TrackerError(f"tensor {name!r} has layout {t.layout}; only dense (strided) tensors can be tracked")
    if t.is_quantized:
        raise TrackerError(f"tensor {name!r} is a quantized tensor ({t.dtype}); not supported by the hook")
    try:
        return dtypes.from_torch(t.dtype).name
    except FormatError:
        raise TrackerError(f"tensor {name!r} has dtype {t.dtype}, which ckptdiff cannot store "
                           f"(supported: {', '.join(dtypes.DTYPES)})") from None


def _ancestors(qualname: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a', '']."""
    out = [qualname]
    while qualname:
        qualname = qualname.rpartition(".")[0]
        out.append(qualname)
    return out


def _compile_patterns(patterns: str | Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    pats = list(patterns)
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise TrackerError("trainable= must be a non-empty glob pattern or list of patterns, e.g. ['classifier.*']")
    return pats


def collect(model: Any, *, optimizer_ids: set[int] | None, trainable: str | Sequence[str] | None = None
            ) -> ModelTensors:
    """Name, validate and classify every tensor of ``model`` (see the module docstring)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TrackerError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    module = unwrap(model)
    _refuse_sharded(module)
    param_ids = {id(p) for p in module.parameters()}
    out = ModelTensors(module)
    by_id: dict[int, Slot] = {}
    sd = module.state_dict(keep_vars=True)
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue  # get_extra_state() payloads are not tensors
        dt = _check_tensor(name, t)
        slot = by_id.get(id(t))
        if slot is None:
            slot = by_id[id(t)] = Slot([name], t, "param" if id(t) in param_ids else "buffer", dtype=dt)
            out.slots.append(slot)
        else:
            slot.names.append(name)
        out.by_name[name] = slot
    if not out.slots:
        raise TrackerError(f"model {type(module).__name__} has no parameters or buffers to track")
    for mod_name, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for local in list(sub._parameters) + list(sub._buffers):
            out.owner.setdefault(prefix + local, mod_name)

    pats = _compile_patterns(trainable)
    if pats is not None:
        names = list(out.by_name)
        for p in pats:
            if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names):
                sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise TrackerError(f"trainable pattern {p!r} matches no tensor of the model (names look like: "
                                   f"{sample})")
    for slot in out.slots:
        if slot.kind != "param":
            continue
        if pats is not None:
            hit = any(n == p or fnmatch.fnmatchcase(n, p) for n in slot.names for p in pats)
        elif optimizer_ids is not None:
            hit = slot.tensor.requires_grad and id(slot.tensor) in optimizer_ids
        else:
            hit = slot.tensor.requires_grad
        slot.role = "trainable" if hit else "frozen"

    _classify_buffers(out)
    return out


def _classify_buffers(out: ModelTensors) -> None:
    """A buffer is frozen when the nearest module (itself or an ancestor) that has parameters has only frozen ones."""
    mods = dict(out.module.named_modules(remove_duplicate=False))
    role_by_id = {id(s.tensor): s.role for s in out.slots if s.kind == "param"}
    trains: dict[str, bool | None] = {}

    def module_trains(qual: str) -> bool | None:
        if qual not in trains:
            sub = mods.get(qual)
            params = [] if sub is None else list(sub.parameters())
            trains[qual] = None if not params else any(role_by_id.get(id(p)) == "trainable" for p in params)
        return trains[qual]

    for slot in out.slots:
        if slot.kind != "buffer":
            continue
        owner = out.owner.get(slot.name, slot.name.rpartition(".")[0])
        verdict: bool | None = None
        for anc in _ancestors(owner):
            verdict = module_trains(anc)
            if verdict is not None:
                break
        slot.role = "buffer" if verdict else "frozen"


def optimizer_tensor_ids(optimizer: Any) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def names_of(tensors: Iterable[Any], limit: int = 8) -> str:
    """'a, b, c and 5 more' for messages."""
    items = list(tensors)
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


__all__ = ["TrackerError", "Slot", "ModelTensors", "collect", "unwrap", "optimizer_tensor_ids", "names_of"]
