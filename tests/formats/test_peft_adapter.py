"""A PEFT adapter directory opens as a checkpoint: PEFT's own saved state dict is the oracle.

The model is a plain torch MLP (PEFT's custom-model support), so the test
needs no transformers model; the safetensors case must not import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from ckptdiff.cli import main  # noqa: E402
from ckptdiff.formats import open_checkpoint, sniff  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(8, 2)


def save_adapter(path: str, *, safe: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Save a LoRA adapter of an MLP; returns PEFT's own state dict of it (what the files must hold)."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body.0", "body.2"],
                                                    modules_to_save=["head"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 7)
    pm.save_pretrained(path, safe_serialization=safe)
    return {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(pm).items()}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_adapter_dir_opens_with_peft_state_dict_and_config(tmp_path, safe):
    d = os.fspath(tmp_path / "adapter")
    expected = save_adapter(d, safe=safe)
    assert sniff(d) == "peft-adapter"
    with open_checkpoint(d) as ck:
        assert ck.format == "peft-adapter" and ck.path == d
        assert set(ck) == set(expected)
        for name, arr in expected.items():
            np.testing.assert_array_equal(ck[name].numpy(), arr)
        with open(os.path.join(d, "adapter_config.json")) as f:
            assert ck.metadata["adapter_config"] == json.load(f)
        assert ck.metadata["adapter_weights"] == ("adapter_model.safetensors" if safe else "adapter_model.bin")


def test_diff_of_two_adapters_is_a_plain_diff(tmp_path, capsys):
    a, b = os.fspath(tmp_path / "a"), os.fspath(tmp_path / "b")
    save_adapter(a, seed=0)
    save_adapter(b, seed=1)  # same B (set deterministically), other random A and head
    rc = main(["diff", a, b, "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["old"]["format"] == "peft-adapter"
    changed = {t["name"] for t in report["tensors"] if t["status"] == "changed"}
    assert changed and not any("lora_B" in n for n in changed)
    assert "merge" not in report["tensors"][0] and "lora" not in report  # a plain diff has no merge fields


def test_opening_a_safetensors_adapter_does_not_import_torch(tmp_path):
    d = os.fspath(tmp_path / "adapter")
    save_adapter(d)
    code = ("import sys; from ckptdiff.formats import open_checkpoint; ck = open_checkpoint(sys.argv[1]); "
            "[ck[n].numpy() for n in ck]; print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    p = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "NO-TORCH"


def test_config_without_weights_is_one_line_exit_2(tmp_path, capsys):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    assert main(["diff", os.fspath(d), os.fspath(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has adapter_config.json but neither adapter_model.safetensors nor" in err


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "adapter config is not a JSON object"),
    ("{not json", "adapter config is not valid JSON"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, message):
    d = tmp_path / "adapter"
    save_adapter(os.fspath(d))
    (d / "adapter_config.json").write_text(text)
    assert main(["diff", os.fspath(d), os.fspath(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
