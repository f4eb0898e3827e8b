"""Reading an adapter's names and config: PEFT's key layouts, its pattern rule, one name rule per adapter."""

from __future__ import annotations

import pytest

from ckptdiff.errors import CkptError
from ckptdiff.lora.config import LoraSettings, lora_settings
from ckptdiff.lora.keys import NameRule, match_names, parse_adapter_keys

P = "base_model.model."


def test_keys_with_and_without_the_adapter_name():
    plain = parse_adapter_keys([P + "enc.q.lora_A.weight", P + "enc.q.lora_B.weight",
                                P + "emb.lora_embedding_A", P + "emb.lora_embedding_B"], "x")
    named = parse_adapter_keys(["enc.q.lora_A.mine.weight", "enc.q.lora_B.mine.weight", "enc.q.lora_B.mine.bias",
                                "emb.lora_embedding_A.mine", "emb.lora_embedding_B.mine",
                                P + "head.modules_to_save.mine.weight"], "x")
    assert plain.adapter_name is None and named.adapter_name == "mine"
    assert set(plain.pairs) == set(named.pairs) == {"enc.q", "emb"}
    assert plain.pairs["emb"].embedding and not plain.pairs["enc.q"].embedding
    assert named.pairs["enc.q"].bias_key == "enc.q.lora_B.mine.bias"
    assert named.copies == {"head.weight": P + "head.modules_to_save.mine.weight"}


@pytest.mark.parametrize("keys,message", [
    (["a.lora_A.x.weight", "a.lora_B.x.weight", "b.lora_A.y.weight", "b.lora_B.y.weight"], "several adapters (x, y)"),
    (["a.lora_A.weight"], "no lora_B for module 'a'"),
    (["a.lora_A.weight", "a.lora_B.weight", "a.lora_magnitude_vector"], "DoRA magnitude vector"),
    (["a.lora_A.weight", "a.lora_A.default.weight", "a.lora_B.weight"], "two tensors for 'a' lora_A"),
    (["a.lora_A.bias", "a.lora_B.weight"], "is not named as PEFT names LoRA weights"),
    (["head.weight"], "holds no LoRA weights"),
])
def test_unreadable_key_sets_are_errors(keys, message):
    with pytest.raises(CkptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_adapter_keys(keys, "x")


def test_one_rule_maps_every_name():
    base = {"model.enc.q.weight", "model.enc.k.weight", "model.head.weight", "q.weight"}
    rule, mapping = match_names(["enc.q.weight", "enc.k.weight", "head.weight"], base, "x")
    assert rule == NameRule(0, "model.") and mapping["head.weight"] == "model.head.weight"
    rule, mapping = match_names(["outer.enc.q.weight", "outer.enc.k.weight"], {"enc.q.weight", "enc.k.weight"}, "x")
    assert rule == NameRule(1)
    assert mapping == {"outer.enc.q.weight": "enc.q.weight", "outer.enc.k.weight": "enc.k.weight"}
    with pytest.raises(CkptError, match="adapter target 'enc.v.weight' has no tensor in BASE \\(looked for "
                                        "'model.enc.v.weight', matching adapter names prefixed with 'model.'"):
        match_names(["enc.q.weight", "enc.v.weight"], base, "x")


def test_rank_and_alpha_patterns_follow_peft():
    """PEFT's own pattern lookup is the oracle for which key applies to which module."""
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    rank_pattern = {"layers.1.attn.q": 2, "v": 8, r"layers\.[23]\.mlp": 16}
    alpha_pattern = {"q": 3, "layers.0.attn.v": 5}
    s = lora_settings({"peft_type": "LORA", "r": 4, "lora_alpha": 7, "rank_pattern": rank_pattern,
                       "alpha_pattern": alpha_pattern}, "x")
    modules = ["model.layers.0.attn.q", "model.layers.1.attn.q", "model.layers.0.attn.v", "model.layers.1.attn.vv",
               "model.layers.2.mlp", "model.layers.3.mlp", "model.layers.4.mlp", "q", "xq", "v"]
    for m in modules:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), m), 4)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), m), 7)
        assert s.rank_and_alpha(m) == (r, alpha), m


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert LoraSettings(r=16, lora_alpha=8).scaling("m") == (16, 0.5)
    assert LoraSettings(r=16, lora_alpha=8, use_rslora=True).scaling("m") == (16, 2.0)


@pytest.mark.parametrize("config,message", [
    ({"peft_type": "LORA", "r": 0, "lora_alpha": 1}, "r must be a whole number from 1"),
    ({"peft_type": "LORA", "r": True, "lora_alpha": 1}, "r must be a whole number from 1"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 1, "use_rslora": "yes"}, "use_rslora must be true or false"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 1, "rank_pattern": {"(": 2}}, "is not a valid regular expression"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 1, "rank_pattern": {"q": 2.5}}, r"rank_pattern\['q'\] must be"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 1, "init_lora_weights": "mica"}, "init_lora_weights='mica'"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 1, "target_parameters": ["experts.w"]}, "sets target_parameters"),
    ({"r": 4, "lora_alpha": 1}, "has no peft_type 'LORA'"),
])
def test_bad_or_unsupported_configs_are_refused(config, message):
    with pytest.raises(CkptError, match=message):
        lora_settings(config, "x")
