"""What a LoRA adapter says each BASE tensor must become once merged.

Reads only headers and the adapter's config (the factors themselves are
read when a target is checked): every LoRA pair is placed on a BASE tensor,
its rank checked against the config, its orientation decided, and every
inconsistency is an error that names the module, before anything is
compared.

Orientation: a Linear or Conv weight ``(out, in, ...)`` merges ``B @ A``;
an embedding (``lora_embedding_A/B``) and a ``fan_in_fan_out`` layer
(GPT-2's ``Conv1D``, weight ``(in, out)``) merge its transpose. PEFT itself
decides ``fan_in_fan_out`` from the layer type (overriding the config with
a warning), so here the shape decides when only one orientation fits BASE,
and the config only for a square weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint, TensorRef
from ..errors import CkptError
from .config import LoraSettings, lora_settings
from .keys import AdapterKeys, LoraPair, NameRule, match_names, parse_adapter_keys


@dataclass
class Target:
    """One BASE tensor the adapter changes, and how."""

    kind: str                 # lora | lora-bias | copy (see report.MergeCheck)
    adapter_key: str          # lora_A's key for a pair, else the tensor's own key
    pair: LoraPair | None = None
    rank: int | None = None
    scaling: float | None = None
    transpose: bool = False


@dataclass
class MergePlan:
    """Every BASE tensor name the adapter touches, with what it must become."""

    targets: dict[str, Target]
    settings: LoraSettings
    keys: AdapterKeys
    rule: NameRule

    def describe(self, adapter: Checkpoint) -> dict[str, Any]:
        """The adapter as the JSON report's ``lora`` object shows it."""
        s = self.settings
        return {
            "adapter": adapter.path,
            "adapter_weights": adapter.metadata.get("adapter_weights"),
            "adapter_name": self.keys.adapter_name,
            "r": s.r,
            "lora_alpha": s.lora_alpha,
            "use_rslora": s.use_rslora,
            "fan_in_fan_out": s.fan_in_fan_out,
            "rank_pattern": dict(s.rank_pattern),
            "alpha_pattern": dict(s.alpha_pattern),
            "name_mapping": self.rule.describe(),
            "lora_modules": len(self.keys.pairs),
            "copies": len(self.keys.copies),
        }


def plan_merge(adapter: Checkpoint, base: Checkpoint) -> MergePlan:
    """Place every adapter tensor on BASE; CkptError (naming the module) for anything inconsistent."""
    where = adapter.path
    config = adapter.metadata.get("adapter_config")
    if not isinstance(config, dict):
        raise CkptError("not a PEFT adapter (no adapter_config.json)", where)
    settings = lora_settings(config, where)
    keys = parse_adapter_keys(adapter, where)
    wanted = [f"{p.module}.weight" for p in keys.pairs.values()]
    wanted += [f"{p.module}.bias" for p in keys.pairs.values() if p.bias_key is not None]
    wanted += list(keys.copies)
    rule, mapping = match_names(wanted, base.tensors, where)
    targets: dict[str, Target] = {}
    for pair in keys.pairs.values():
        name = mapping[f"{pair.module}.weight"]
        targets[name] = _lora_target(pair, adapter, base[name], settings, where)
        if pair.bias_key is not None:
            bias_name = mapping[f"{pair.module}.bias"]
            _check_bias(pair, adapter, base[bias_name], where)
            targets[bias_name] = Target("lora-bias", pair.bias_key, pair, 1, targets[name].scaling)
    for path, key in keys.copies.items():
        name = mapping[path]
        if name in targets:
            raise CkptError(f"adapter holds both LoRA factors and a full copy ({key!r}) for BASE tensor {name!r}",
                            where)
        targets[name] = Target("copy", key)
    return MergePlan(targets, settings, keys, rule)


def _lora_target(pair: LoraPair, adapter: Checkpoint, base: TensorRef, settings: LoraSettings,
                 where: str) -> Target:
    a, b = adapter[pair.a_key], adapter[pair.b_key]  # type: ignore[index]  # parse_adapter_keys checked both
    for ref in (a, b, base):
        if ref.dtype_info.kind != "float":
            raise CkptError(f"{ref.name!r} is {ref.dtype}, not a floating-point tensor; a LoRA merge needs floats",
                            where)
    if len(a.shape) < 2 or len(b.shape) < 2 or b.shape[1] != a.shape[0] or any(d != 1 for d in b.shape[2:]):
        raise CkptError(f"module {pair.module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                        "are not factors of one rank", where)
    rank, scaling = settings.scaling(pair.module)
    if a.shape[0] != rank:
        raise CkptError(f"module {pair.module!r}: the adapter config gives rank {rank}, but lora_A has "
                        f"{a.shape[0]} rows", where)
    plain = (b.shape[0], *a.shape[1:])
    flipped = (a.shape[1], b.shape[0]) if len(a.shape) == 2 else None
    if pair.embedding:
        fits = [True] if flipped == base.shape else []
    else:
        fits = [t for t, shape in ((False, plain), (True, flipped)) if shape == base.shape]
    if not fits:
        raise CkptError(f"module {pair.module!r}: lora_B @ lora_A has shape {list(plain)}"
                        + (f" ({list(flipped)} transposed)" if flipped else "")
                        + f", which does not fit BASE tensor {base.name!r} of shape {list(base.shape)}", where)
    transpose = fits[0] if len(fits) == 1 else settings.fan_in_fan_out
    return Target("lora", pair.a_key or "", pair, rank, scaling, transpose)


def _check_bias(pair: LoraPair, adapter: Checkpoint, base: TensorRef, where: str) -> None:
    bias, b = adapter[pair.bias_key], adapter[pair.b_key]  # type: ignore[index]
    if bias.shape != base.shape or bias.shape != (b.shape[0],) or bias.dtype_info.kind != "float":
        raise CkptError(f"module {pair.module!r}: lora_B.bias {bias.dtype}{list(bias.shape)} does not fit "
                        f"BASE tensor {base.name!r} {base.dtype}{list(base.shape)}", where)


__all__ = ["MergePlan", "Target", "plan_merge"]
