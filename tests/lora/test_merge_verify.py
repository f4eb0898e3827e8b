"""`ckptdiff diff BASE MERGED --lora ADAPTER` against real PEFT merges (PEFT and torch are the oracle).

Which tensors a merge changed is found independently (torch.equal of BASE
and MERGED); the check must call exactly those merge-exact and the rest
identical, and catch every kind of tampering with the right verdict. Verdicts
are asserted, never bytes: PEFT's merge runs torch's matmul on this CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("peft")

from ckptdiff.cli import main  # noqa: E402


def run(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def verify_json(capsys, base, merged, adapter) -> tuple[int, dict]:
    rc, out, err = run(capsys, "diff", base, merged, "--lora", adapter, "--format", "json")
    assert rc in (0, 1), err
    return rc, json.loads(out)


def merges(report: dict) -> dict[str, dict]:
    return {t["name"]: t["merge"] for t in report["tensors"]}


def tampered(case, tmp_path, edit) -> str:
    """MERGED with ``edit(arrays)`` applied, written beside the test."""
    arrays = load_file(case.merged)
    edit(arrays)
    path = os.fspath(tmp_path / "tampered.safetensors")
    save_file(arrays, path)
    return path


# ---------------------------------------------------------------------------
# real merges verify
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "gpt2_rslora", "bf16", "patterns_bin", "lora_bias"])
def test_a_peft_merge_verifies_exactly_its_targets(lora_case, capsys, name):
    case = lora_case(name)
    rc, report = verify_json(capsys, case.base, case.merged, case.adapter)
    assert rc == 0 and report["verdict"] == {"failed": False, "reasons": []}
    verdicts = {n: m["verdict"] for n, m in merges(report).items()}
    assert {n for n, v in verdicts.items() if v == "merge-exact"} == set(case.targets)
    assert {n for n, v in verdicts.items() if v == "identical"} == set(case.others)
    for n in case.targets:
        m = merges(report)[n]
        assert m["tolerance_ratio"] <= 1 and m["elements_off"] == 0
    assert report["lora"]["summary"] == {"merge-exact": len(case.targets), "merge-off": 0, "changed-outside": 0,
                                         "identical": len(case.others)}


def test_scaling_follows_rslora_and_the_per_module_patterns(lora_case, capsys):
    _, rs = verify_json(capsys, *(lambda c: (c.base, c.merged, c.adapter))(lora_case("gpt2_rslora")))
    assert {m["scaling"] for m in merges(rs).values() if m["kind"] == "lora"} == {8 / math.sqrt(4)}
    assert rs["lora"]["use_rslora"] is True
    case = lora_case("patterns_bin")
    _, pat = verify_json(capsys, case.base, case.merged, case.adapter)
    got = {n: (m["rank"], m["scaling"]) for n, m in merges(pat).items() if m["kind"] == "lora"}
    assert got == {"bert.encoder.layer.0.attention.self.query.weight": (4, 2.0),
                   "bert.encoder.layer.0.attention.self.value.weight": (2, 4.0),
                   "bert.encoder.layer.1.attention.self.query.weight": (4, 8.0),
                   "bert.encoder.layer.1.attention.self.value.weight": (2, 4.0)}
    assert pat["lora"]["adapter_weights"] == "adapter_model.bin"


def test_kinds_name_what_the_adapter_holds(lora_case, capsys):
    case = lora_case("bert")
    _, report = verify_json(capsys, case.base, case.merged, case.adapter)
    m = merges(report)
    assert m["classifier.weight"]["kind"] == "copy" and m["classifier.bias"]["kind"] == "copy"
    assert m["bert.embeddings.word_embeddings.weight"]["kind"] == "lora"
    assert m["bert.embeddings.word_embeddings.weight"]["adapter_key"].endswith("lora_embedding_A")
    assert m["bert.pooler.dense.weight"] == {"verdict": "identical", "kind": None, "adapter_key": None, "rank": None,
                                             "scaling": None, "max_error": None, "tolerance_ratio": None,
                                             "elements_off": None, "note": None}
    bias = lora_case("lora_bias")
    _, rb = verify_json(capsys, bias.base, bias.merged, bias.adapter)
    assert merges(rb)["bert.encoder.layer.0.attention.self.query.bias"]["kind"] == "lora-bias"


def test_orientation_comes_from_the_shape_and_for_square_weights_from_the_config(lora_case, capsys, tmp_path):
    """With fan_in_fan_out wrongly false, only the square Conv1D weights (attn.c_proj) are checked un-transposed."""
    case = lora_case("gpt2_rslora")
    rc, report = verify_json(capsys, case.base, case.merged,
                             broken_adapter(case, tmp_path, config=_set("fan_in_fan_out", False)))
    assert rc == 1
    off = {n for n, m in merges(report).items() if m["verdict"] == "merge-off"}
    assert off == {"h.0.attn.c_proj.weight", "h.1.attn.c_proj.weight"}
    assert {n for n, m in merges(report).items() if m["verdict"] == "merge-exact"} == set(case.targets) - off


def test_base_saved_under_another_prefix_still_maps(lora_case, capsys, tmp_path):
    """A base saved from a wrapper (names under 'model.') is matched by one rule for the whole adapter."""
    case = lora_case("bert")
    paths = []
    for src in (case.base, case.merged):
        arrays = {f"model.{k}": v for k, v in load_file(src).items()}
        paths.append(os.fspath(tmp_path / os.path.basename(src)))
        save_file(arrays, paths[-1])
    rc, report = verify_json(capsys, paths[0], paths[1], case.adapter)
    assert rc == 0
    assert report["lora"]["name_mapping"] == "adapter names prefixed with 'model.'"
    assert report["lora"]["summary"]["merge-exact"] == len(case.targets)


def test_row_blocks_give_the_same_verdicts(lora_case, monkeypatch):
    """Memory is bounded by checking a few rows at a time; the verdicts must not depend on the block size."""
    from ckptdiff.checkpoint import TensorRef
    from ckptdiff.lora import check, verify_merge

    case = lora_case("bert")
    whole = verify_merge(case.base, case.merged, case.adapter)
    monkeypatch.setattr(check, "BLOCK_ELEMENTS", 40)  # one 32-wide row per block
    checking: list[bool] = []
    elements: list[int] = []  # elements per chunk the merge check read
    chunks, check_delta = TensorRef.chunks, check.check_delta

    def counted(self, *args, **kwargs):
        for c in chunks(self, *args, **kwargs):
            if checking:
                elements.append(c.nbytes // self.itemsize)
            yield c

    def spy(*args, **kwargs):
        checking.append(True)
        try:
            return check_delta(*args, **kwargs)
        finally:
            checking.pop()

    monkeypatch.setattr(TensorRef, "chunks", counted)
    monkeypatch.setattr("ckptdiff.lora.check_delta", spy)
    blocked = verify_merge(case.base, case.merged, case.adapter)
    assert [(t.name, t.merge.verdict) for t in blocked.tensors] == [(t.name, t.merge.verdict) for t in whole.tensors]
    assert max(elements) == 32 and len(elements) >= 2 * (4 * 32 + 64)  # base and merged, row by row


# ---------------------------------------------------------------------------
# tampered merges are caught, with the right verdict per tensor
# ---------------------------------------------------------------------------

TARGET = "bert.encoder.layer.1.attention.self.query.weight"


def test_one_element_off_in_one_target(lora_case, capsys, tmp_path):
    case = lora_case("bert")

    def nudge(a):
        a[TARGET][3, 5] += 1e-3
    rc, report = verify_json(capsys, case.base, tampered(case, tmp_path, nudge), case.adapter)
    assert rc == 1
    m = merges(report)
    assert m[TARGET]["verdict"] == "merge-off" and m[TARGET]["elements_off"] == 1
    assert m[TARGET]["max_error"] == pytest.approx(1e-3, rel=1e-3)
    assert [n for n, x in m.items() if x["verdict"] == "merge-off"] == [TARGET]
    assert report["verdict"]["reasons"] == [
        f"tensor {TARGET} merge-off by 0.001 (1 elements differ from BASE + scaling·B@A beyond tolerance)"]


def test_one_ulp_outside_the_adapter_is_changed_outside(lora_case, capsys, tmp_path):
    case = lora_case("bert")
    frozen = "bert.encoder.layer.0.attention.output.LayerNorm.weight"

    def ulp(a):
        a[frozen][7] = np.nextafter(a[frozen][7], np.float32(np.inf))
    rc, report = verify_json(capsys, case.base, tampered(case, tmp_path, ulp), case.adapter)
    assert rc == 1
    m = merges(report)
    assert m[frozen]["verdict"] == "changed-outside"
    assert [n for n, x in m.items() if x["verdict"] in ("merge-off", "changed-outside")] == [frozen]
    assert report["lora"]["summary"]["merge-exact"] == len(case.targets)


def test_a_target_left_unmerged_and_a_wrong_head_copy(lora_case, capsys, tmp_path):
    case = lora_case("bert")
    base = load_file(case.base)

    def unmerge(a):
        a[TARGET] = base[TARGET]
        a["classifier.bias"] = a["classifier.bias"] + np.float32(0.5)
    rc, report = verify_json(capsys, case.base, tampered(case, tmp_path, unmerge), case.adapter)
    assert rc == 1
    m = merges(report)
    assert m[TARGET]["verdict"] == "merge-off" and m[TARGET]["elements_off"] > 0.9 * base[TARGET].size
    assert m["classifier.bias"]["verdict"] == "merge-off" and m["classifier.bias"]["max_error"] == 0.5
    assert {n for n, x in m.items() if x["verdict"] == "merge-off"} == {TARGET, "classifier.bias"}
    stale = [t["name"] for t in report["tensors"] if t["stale"]]
    assert stale == [TARGET]  # an unmerged target is also bitwise identical to BASE


def test_bf16_target_left_unmerged(lora_case, capsys, tmp_path):
    case = lora_case("bf16")
    target = case.targets[0]
    base = load_file(case.base)

    def unmerge(a):
        a[target] = base[target]
    rc, report = verify_json(capsys, case.base, tampered(case, tmp_path, unmerge), case.adapter)
    assert rc == 1 and merges(report)[target]["verdict"] == "merge-off"
    assert base[target].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("fmt,expect", [
    ("table", ["MERGE-OFF", "off by 0.001", "FAIL: 1 target merge-off, 1 tensor changed outside the adapter"]),
    ("markdown", ["🔴 merge-off", "off by 0.001", "FAIL: 1 target merge-off, 1 tensor changed outside the adapter"]),
    ("github", ["::error file=", "title=ckptdiff%3A merge-off%3A ",
                "title=ckptdiff%3A changed outside the adapter%3A ",
                "FAIL: 1 target merge-off, 1 tensor changed outside the adapter"]),
])
def test_every_format_says_the_verdicts(lora_case, capsys, tmp_path, fmt, expect):
    case = lora_case("bert")

    def both(a):
        a[TARGET][0, 0] += 1e-3
        a["bert.pooler.dense.bias"][0] += 1
    rc, out, _ = run(capsys, "diff", case.base, tampered(case, tmp_path, both), "--lora", case.adapter,
                     "--format", fmt)
    assert rc == 1
    for text in expect:
        assert text in out
    assert "bert.pooler.dense.bias" in out and TARGET[:30] in out  # a table folds long names


def test_fail_on_never_reports_but_passes(lora_case, capsys, tmp_path):
    case = lora_case("bert")

    def nudge(a):
        a[TARGET][0, 0] += 1e-3
    rc, out, _ = run(capsys, "diff", case.base, tampered(case, tmp_path, nudge), "--lora", case.adapter,
                     "--fail-on", "never")
    assert rc == 0 and "PASS (--fail-on never): 1 merge-off, 0 changed outside the adapter" in out


# ---------------------------------------------------------------------------
# a bad adapter is trouble: exit 2, one line
# ---------------------------------------------------------------------------

def broken_adapter(case, tmp_path, *, config=None, tensors=None, drop_config=False) -> str:
    """A copy of the case's adapter with its config and/or tensors edited."""
    d = tmp_path / "adapter"
    shutil.copytree(case.adapter, d)
    cfg_path = d / "adapter_config.json"
    if drop_config:
        cfg_path.unlink()
    elif config is not None:
        cfg = json.loads(cfg_path.read_text())
        config(cfg)
        cfg_path.write_text(json.dumps(cfg))
    if tensors is not None:
        arrays = load_file(os.fspath(d / "adapter_model.safetensors"))
        tensors(arrays)
        save_file(arrays, os.fspath(d / "adapter_model.safetensors"))
    return os.fspath(d)


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


A_KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


def _rename(a):
    a[A_KEY.replace("query", "qurey")] = a.pop(A_KEY)
    b = A_KEY.replace("lora_A", "lora_B")
    a[b.replace("query", "qurey")] = a.pop(b)


@pytest.mark.parametrize("edit,message", [
    (dict(drop_config=True), "not a PEFT adapter directory: no adapter_config.json"),
    (dict(config=_set("peft_type", "IA3")), "adapter is a 'IA3' PEFT adapter, not LORA"),
    (dict(config=_set("use_dora", True)), "adapter config sets use_dora"),
    (dict(config=_set("r", 8)), "the adapter config gives rank 8, but lora_A has 4 rows"),
    (dict(config=_set("lora_alpha", "eight")), "adapter config lora_alpha must be a finite number"),
    (dict(tensors=lambda a: a.__setitem__(A_KEY, np.ones((4, 16), np.float32))),
     "lora_B @ lora_A has shape [32, 16] ([16, 32] transposed), which does not fit BASE tensor "
     "'bert.encoder.layer.0.attention.self.query.weight' of shape [32, 32]"),
    (dict(tensors=_rename), "adapter target 'bert.encoder.layer.0.attention.self.qurey.weight' has no tensor in BASE"),
    (dict(tensors=lambda a: a.pop(A_KEY)), "adapter has no lora_A for module"),
])
def test_bad_adapter_is_one_line_exit_2(lora_case, capsys, tmp_path, edit, message):
    case = lora_case("bert")
    rc, out, err = run(capsys, "diff", case.base, case.merged, "--lora", broken_adapter(case, tmp_path, **edit))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ckptdiff: error: ") and message in err, err


@pytest.mark.parametrize("flags,message", [
    (["--manifest", "m.json"], "--manifest and --lora do not mix"),
    (["--atol", "1e-3"], "--atol/--rtol do not apply with --lora"),
    (["--fail-on", "change"], "--fail-on change does not apply with --lora"),
])
def test_flags_that_would_change_the_meaning_are_refused(lora_case, capsys, flags, message):
    case = lora_case("bert")
    rc, _, err = run(capsys, "diff", case.base, case.merged, "--lora", case.adapter, *flags)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_adapter_path_that_is_not_a_directory(lora_case, capsys):
    case = lora_case("bert")
    rc, _, err = run(capsys, "diff", case.base, case.merged, "--lora", case.base)
    assert rc == 2 and "is not a directory" in err and err.count("\n") == 1


def test_a_safetensors_merge_check_does_not_import_torch(lora_case):
    import subprocess
    import sys

    case = lora_case("bert")
    code = ("import sys; from ckptdiff.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "diff", case.base, case.merged, "--lora", case.adapter, "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "NO-TORCH"
