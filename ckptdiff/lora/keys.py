"""From the tensor names PEFT saves to the tensor names of the base model.

PEFT saves a LoRA module ``<module>`` of the wrapped model as
``base_model.model.<module>.lora_A.weight`` and ``...lora_B.weight``
(``lora_embedding_A``/``lora_embedding_B`` for an embedding, no ``.weight``);
older tools and non-default adapters may keep the adapter name in the key
(``lora_A.default.weight``); ``lora_B.bias`` exists with ``lora_bias=True``.
Anything else in the file is a full copy of a base tensor
(``modules_to_save``, or biases trained with ``bias="all"``), possibly
still under ``modules_to_save.<adapter>.``.

The base checkpoint may have been saved from another wrapper than the one
PEFT wrapped (``model.layers.0...`` vs ``layers.0...``), so names are matched
by one rule for the whole adapter: drop a few leading components, or add a
prefix, whichever maps the most adapter names onto BASE names. A name the
rule cannot place is an error that names it, never a silently skipped target.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ..errors import CkptError

PEFT_PREFIX = "base_model.model."
#: Key component -> (factor, embedding?). An embedding's delta is (B @ A) transposed.
_LORA_PARTS = {"lora_A": ("A", False), "lora_B": ("B", False),
               "lora_embedding_A": ("A", True), "lora_embedding_B": ("B", True)}
#: Candidate rules are collected from this many adapter names (then scored on all).
_RULE_SAMPLES = 8


@dataclass
class LoraPair:
    """One LoRA module of the adapter: its A and B (and optional bias) keys."""

    module: str                 # module name, PEFT's prefix removed
    embedding: bool = False
    a_key: str | None = None
    b_key: str | None = None
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)


@dataclass
class AdapterKeys:
    """An adapter's tensors sorted into LoRA pairs and full copies."""

    pairs: dict[str, LoraPair]
    #: Tensor name (PEFT's prefix and ``modules_to_save.<adapter>.`` removed) -> adapter key.
    copies: dict[str, str]
    adapter_name: str | None = None


def parse_adapter_keys(keys: Iterable[str], where: str) -> AdapterKeys:
    """Sort an adapter's tensor names into LoRA pairs and full copies; CkptError on anything unreadable."""
    pairs: dict[str, LoraPair] = {}
    copies: dict[str, str] = {}
    names: set[str] = set()
    for key in keys:
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        at = next((i for i in range(len(parts) - 1, max(-1, len(parts) - 4), -1) if parts[i].startswith("lora_")),
                  None)
        if at is None:
            path, adapter = _copy_path(parts)
            if adapter is not None:
                names.add(adapter)
            if path in copies:
                raise CkptError(f"adapter holds two copies of {path!r}: {copies[path]!r} and {key!r}", where)
            copies[path] = key
            continue
        kind = _LORA_PARTS.get(parts[at])
        if kind is None:
            what = "a DoRA magnitude vector (use_dora)" if parts[at] == "lora_magnitude_vector" else "not LoRA A/B"
            raise CkptError(f"adapter tensor {key!r} is {what}; --lora verifies plain LoRA merges only", where)
        factor, embedding = kind
        module, tail = ".".join(parts[:at]), parts[at + 1:]
        param, adapter = _tail(tail, embedding)
        if not module or param is None or (param == "bias" and factor != "B"):
            raise CkptError(f"adapter tensor {key!r} is not named as PEFT names LoRA weights "
                            f"(<module>.{parts[at]}{'' if embedding else '.weight'})", where)
        if adapter is not None:
            names.add(adapter)
        pair = pairs.setdefault(module, LoraPair(module, embedding))
        if pair.embedding != embedding:
            raise CkptError(f"adapter mixes lora_A/B and lora_embedding_A/B for module {module!r}", where)
        slot = "bias_key" if param == "bias" else "a_key" if factor == "A" else "b_key"
        if getattr(pair, slot) is not None:
            raise CkptError(f"adapter holds two tensors for {module!r} {parts[at]}: "
                            f"{getattr(pair, slot)!r} and {key!r} (several adapters in one file?)", where)
        setattr(pair, slot, key)
    if len(names) > 1:
        raise CkptError(f"adapter file holds several adapters ({', '.join(sorted(names))}); save one per directory",
                        where)
    for pair in pairs.values():
        missing = "lora_B" if pair.b_key is None else "lora_A" if pair.a_key is None else None
        if missing:
            raise CkptError(f"adapter has no {missing} for module {pair.module!r}", where)
    if not pairs:
        raise CkptError("adapter holds no LoRA weights (no lora_A/lora_B tensors)", where)
    return AdapterKeys(pairs, copies, next(iter(names), None))


def _tail(tail: list[str], embedding: bool) -> tuple[str | None, str | None]:
    """(param, adapter name) after ``lora_X``: ``[weight]``, ``[name, weight]``; an embedding's ``[]``, ``[name]``."""
    if embedding:
        if len(tail) <= 1:
            return "weight", (tail[0] if tail else None)
        return None, None
    if len(tail) == 1 and tail[0] in ("weight", "bias"):
        return tail[0], None
    if len(tail) == 2 and tail[1] in ("weight", "bias"):
        return tail[1], tail[0]
    return None, None


def _copy_path(parts: list[str]) -> tuple[str, str | None]:
    """A full copy's tensor name, ``modules_to_save.<adapter>.`` removed; and that adapter name."""
    if "modules_to_save" in parts[:-1]:
        i = parts.index("modules_to_save")
        if i + 2 < len(parts):
            return ".".join(parts[:i] + parts[i + 2:]), parts[i + 1]
    return ".".join(parts), None


@dataclass(frozen=True)
class NameRule:
    """How adapter names become BASE names: drop ``drop`` leading components, then prepend ``add``."""

    drop: int = 0
    add: str = ""

    def apply(self, name: str) -> str | None:
        parts = name.split(".")
        if self.drop >= len(parts):
            return None
        return self.add + ".".join(parts[self.drop:])

    def describe(self) -> str:
        if self.drop:
            return f"adapter names without their first {self.drop} component(s)" + (
                f", prefixed with {self.add!r}" if self.add else "")
        return f"adapter names prefixed with {self.add!r}" if self.add else "adapter names as they are"


def match_names(names: list[str], base: Collection[str], where: str) -> tuple[NameRule, dict[str, str]]:
    """One :class:`NameRule` for all ``names`` (adapter-side tensor names) and the BASE name of each.

    CkptError naming the first name the best rule cannot place in ``base``.
    """
    if not names:
        return NameRule(), {}
    candidates: dict[NameRule, None] = {NameRule(): None}
    for name in names[:_RULE_SAMPLES]:
        suffix = "." + name
        for b in base:
            if b.endswith(suffix):
                candidates[NameRule(0, b[:-len(name)])] = None
        parts = name.split(".")
        for k in range(1, len(parts) - 1):  # keep at least "<leaf>.<param>"
            if ".".join(parts[k:]) in base:
                candidates[NameRule(k)] = None

    def score(rule: NameRule) -> int:
        return sum(1 for n in names if rule.apply(n) in base)

    # Most names placed; on a tie the smallest change (no rule before dropping before adding).
    rule = max(candidates, key=lambda r: (score(r), -r.drop, -len(r.add)))
    mapping: dict[str, str] = {}
    for n in names:
        target = rule.apply(n)
        if target is None or target not in base:
            expected = target if target is not None else n
            example = next(iter(base), None)
            raise CkptError(
                f"adapter target {n!r} has no tensor in BASE (looked for {expected!r}, matching {rule.describe()}; "
                f"BASE has {len(base)} tensors" + (f", e.g. {example!r})" if example else ")"), where)
        mapping[n] = target
    return rule, mapping


__all__ = ["AdapterKeys", "LoraPair", "NameRule", "PEFT_PREFIX", "match_names", "parse_adapter_keys"]
