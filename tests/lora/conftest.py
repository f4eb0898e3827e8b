"""Real PEFT merges for the LoRA tests, built once per test process and shared read-only.

Tests that change files copy them into their own tmp_path first.
"""

from __future__ import annotations

from typing import Any

import pytest

#: name -> (model kind, build options): one case per feature the merge check must honour.
CASES: dict[str, dict[str, Any]] = {
    # Linear targets, an embedding target, and a classifier head in modules_to_save.
    "bert": dict(kind="bert", r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
                 modules_to_save=["classifier"]),
    # GPT-2's Conv1D stores weights (in, out): fan_in_fan_out (attn.c_proj is square: the config decides);
    # rsLoRA scaling alpha/sqrt(r).
    "gpt2_rslora": dict(kind="gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        use_rslora=True),
    # bf16 weights (PEFT keeps the factors in float32 and merges through float32 on CPU).
    "bf16": dict(kind="bert", dtype="bfloat16", r=4, lora_alpha=8, target_modules=["query", "key", "dense"]),
    # Per-module rank and alpha, the adapter saved as a torch .bin.
    "patterns_bin": dict(kind="bert", safe=False, r=4, lora_alpha=8, target_modules=["query", "value"],
                         rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 32}),
    # lora_bias=True: lora_B has a bias, merged into the base layer's bias.
    "lora_bias": dict(kind="bert", r=4, lora_alpha=16, target_modules=["query"], lora_bias=True),
}


@pytest.fixture(scope="session")
def lora_case(tmp_path_factory):
    """``lora_case(name)`` -> a built :class:`lora_cases.Case` (built on first use in this process)."""
    from lora_cases import build_case
    import torch

    built: dict[str, Any] = {}

    def get(name: str):
        if name not in built:
            opts = dict(CASES[name])
            dtype = opts.pop("dtype", None)
            built[name] = build_case(str(tmp_path_factory.mktemp(name)), opts.pop("kind"),
                                     dtype=getattr(torch, dtype) if dtype else None, **opts)
        return built[name]
    return get
