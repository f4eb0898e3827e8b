"""The part of a PEFT ``adapter_config.json`` that decides what a LoRA merge must produce.

PEFT merges a LoRA module as ``W += scaling * B @ A`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``),
``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` and
``alpha_pattern``. A pattern key is a regular expression matched against the
end of the module's name at a dot boundary (PEFT's own rule,
``(.*\\.)?(KEY)$``), the first key in file order that matches wins.

Everything here is untrusted input: each field is type-checked, and a config
for a variant whose merge is *not* ``scaling * B @ A`` (DoRA, ...) or for
another PEFT method is refused with one line rather than misverified.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CkptError

#: Config fields that select a LoRA variant (or an extra trainable part) whose
#: merged weights are not ``W + scaling * B @ A``: any truthy value is refused.
UNSUPPORTED = (
    "use_dora", "use_qalora", "use_bdlora", "velora_config", "alora_invocation_tokens", "monteclora_config",
    "arrow_config", "kasa_config", "target_parameters", "trainable_token_indices", "layer_replication",
)
#: ``init_lora_weights`` values that select a variant layer (its own merge rule).
UNSUPPORTED_INITS = ("mica",)
#: A rank this large is a corrupt config, not an adapter (and would size work).
MAX_RANK = 1 << 20
#: Longer pattern keys are not module names; keeps regex compilation bounded.
MAX_PATTERN_CHARS = 1000


@dataclass(frozen=True)
class LoraSettings:
    """Validated merge settings of one LoRA adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    _compiled: dict[str, re.Pattern[str]] = field(default_factory=dict, compare=False, repr=False)

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for a module name, after ``rank_pattern``/``alpha_pattern``."""
        r = self._lookup(self.rank_pattern, module)
        alpha = self._lookup(self.alpha_pattern, module)
        return (self.r if r is None else int(r)), (self.lora_alpha if alpha is None else float(alpha))

    def scaling(self, module: str) -> tuple[int, float]:
        """``(r, scaling)`` of ``module``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r, alpha = self.rank_and_alpha(module)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)

    def _lookup(self, patterns: Mapping[str, Any], module: str) -> Any:
        for key, value in patterns.items():
            if self.regex(key).fullmatch(module):
                return value
        return None

    def regex(self, key: str) -> re.Pattern[str]:
        """A pattern key as PEFT reads it: the whole key at the end of the name, after a dot or at its start."""
        rx = self._compiled.get(key)
        if rx is None:
            rx = self._compiled[key] = re.compile(rf"(?:.*\.)?(?:{key})")
        return rx


def lora_settings(config: Mapping[str, Any], where: str) -> LoraSettings:
    """Validate a parsed ``adapter_config.json`` for a merge check; CkptError naming the field if it cannot be."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CkptError(f"adapter is a {peft_type!r} PEFT adapter, not LORA; --lora verifies LoRA merges only"
                        if isinstance(peft_type, str) else "adapter config has no peft_type 'LORA'", where)
    for key in UNSUPPORTED:
        if config.get(key):
            raise CkptError(f"adapter config sets {key}: a LoRA variant whose merge is not BASE + scaling·B@A, "
                            "which --lora cannot verify", where)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in UNSUPPORTED_INITS:
        raise CkptError(f"adapter config sets init_lora_weights={init!r}: a LoRA variant whose merge is not "
                        "BASE + scaling·B@A, which --lora cannot verify", where)
    settings = LoraSettings(
        r=_rank(config.get("r"), "r", where),
        lora_alpha=_number(config.get("lora_alpha"), "lora_alpha", where),
        use_rslora=_flag(config.get("use_rslora", False), "use_rslora", where),
        fan_in_fan_out=_flag(config.get("fan_in_fan_out", False), "fan_in_fan_out", where),
        rank_pattern={k: _rank(v, f"rank_pattern[{k!r}]", where)
                      for k, v in _patterns(config.get("rank_pattern"), "rank_pattern", where).items()},
        alpha_pattern={k: _number(v, f"alpha_pattern[{k!r}]", where)
                       for k, v in _patterns(config.get("alpha_pattern"), "alpha_pattern", where).items()},
    )
    for name, pats in (("rank_pattern", settings.rank_pattern), ("alpha_pattern", settings.alpha_pattern)):
        for key in pats:
            try:
                settings.regex(key)
            except (re.error, RecursionError, OverflowError) as e:
                raise CkptError(f"adapter config {name} key {key[:80]!r} is not a valid regular expression ({e})",
                                where) from None
    return settings


def _rank(v: Any, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_RANK:
        raise CkptError(f"adapter config {what} must be a whole number from 1 to {MAX_RANK}, not {v!r}"[:300], where)
    return v


def _number(v: Any, what: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise CkptError(f"adapter config {what} must be a finite number, not {v!r}"[:300], where)
    return float(v)


def _flag(v: Any, what: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise CkptError(f"adapter config {what} must be true or false, not {v!r}"[:300], where)
    return v


def _patterns(v: Any, what: str, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and 0 < len(k) <= MAX_PATTERN_CHARS for k in v):
        raise CkptError(f"adapter config {what} must map module-name patterns (up to {MAX_PATTERN_CHARS} "
                        "characters) to numbers", where)
    return v


__all__ = ["LoraSettings", "lora_settings", "UNSUPPORTED"]
