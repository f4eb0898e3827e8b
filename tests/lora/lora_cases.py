"""Real PEFT LoRA merges built from tiny models in code: BASE, adapter directory and MERGED on disk.

PEFT is the oracle: it saves the adapter and computes the merge
(``merge_and_unload``) with torch's own kernels, on whatever CPU runs the
tests; the checks under test must recognise its output as exact.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402


@dataclass
class Case:
    base: str
    merged: str
    adapter: str
    targets: list[str]       # BASE tensor names the adapter changes
    others: list[str]        # every other BASE tensor name


def tiny_model(kind: str) -> Any:
    """A randomly initialised model small enough to build in milliseconds (no downloads)."""
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=16, num_labels=3)
        return transformers.BertForSequenceClassification(cfg)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Model(cfg)
    raise ValueError(kind)


def _state(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_case(root: str, kind: str, *, dtype: Any = None, seed: int = 0, safe: bool = True,
               **lora: Any) -> Case:
    """Build BASE, train-like nonzero LoRA factors, save the adapter, merge with PEFT, save MERGED."""
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(seed)
    model = tiny_model(kind)
    if dtype is not None:
        model = model.to(dtype)
    base = _state(model)
    base_path = os.path.join(root, "base.safetensors")
    save_file(base, base_path)
    with warnings.catch_warnings():
        # PEFT's and transformers' advice (deprecations, a 1-D lora_B.bias taken for a ZeRO-3 shard) is not the test's.
        warnings.simplefilter("ignore")
        return _merge(model, root, base_path, base, seed, safe, lora)


def _merge(model: Any, root: str, base_path: str, base: dict[str, Any], seed: int, safe: bool,
           lora: dict[str, Any]) -> Case:
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name and not p.any():  # B (an embedding's A) starts at zero: give it trained values
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.3)
            elif "modules_to_save" in name:
                p.add_(0.125)
    adapter = os.path.join(root, "adapter")
    pm.save_pretrained(adapter, safe_serialization=safe)
    merged_model = pm.merge_and_unload()
    merged = _state(merged_model)
    merged_path = os.path.join(root, "merged.safetensors")
    save_file(merged, merged_path)
    targets = [k for k in base if not torch.equal(base[k], merged[k])]
    return Case(base_path, merged_path, adapter, targets, [k for k in base if k not in targets])
