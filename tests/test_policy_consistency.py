"""The same pair gives the same verdicts in every view: CLI, API, store refs, log/show and the TUI's data layer.

Each pair is diffed through ``ckptdiff diff --format json``, :func:`ckptdiff.diff`,
the TUI's two-file table (hash rows, then the engine's batches merged in), a
store holding both sides (``ckptdiff log`` and ``show``, the TUI's history
table and columns, ``diff DIR@first DIR@latest``), and every view must give
each tensor the same status, role, drift and stale. The pairs carry training
state beside the model (the sample .pt files hold optimizer moments), explicit
and embedded manifests, buffers, tolerances and every status.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import ckptdiff
from ckptdiff.cli import main
from ckptdiff.policy import hash_rows
from ckptdiff.resolve import opened
from ckptdiff.tui.history import HistoryModel
from ckptdiff.tui.measure import pair_manifest, refine
from ckptdiff.tui.rows import merge_measured

SAMPLES = Path(__file__).resolve().parents[1] / "sample_ckpts"
Verdicts = dict[str, tuple[str, str, bool, bool]]


def verdicts(tensors) -> Verdicts:
    return {t.name: (t.status, t.role, t.drift, t.stale) for t in tensors}


def json_verdicts(tensors: list[dict]) -> Verdicts:
    return {t["name"]: (t["status"], t["role"], t["drift"], t["stale"]) for t in tensors}


def settle(rows, old, new, manifest, atol, rtol):
    """The TUI table once the engine has measured everything the hashes left open."""
    table = {r.name: r for r in rows}
    for got in refine(rows, old, new, manifest, atol=atol, rtol=rtol):
        for m in got:
            table[m.name] = merge_measured(table[m.name], m)
    return table.values()


def via_cli(capsys, a: str, b: str, man: str | None, atol: float, rtol: float) -> Verdicts:
    args = ["diff", a, b, "--format", "json", "--all", "--atol", repr(atol), "--rtol", repr(rtol)]
    main(args + (["--manifest", man] if man else []))
    return json_verdicts(json.loads(capsys.readouterr().out)["tensors"])


def via_tui_pair(a: str, b: str, man: str | None, atol: float, rtol: float) -> Verdicts:
    with opened(a, b) as (old, new):
        manifest = pair_manifest(old, new, man)
        return verdicts(settle(hash_rows(old, new, manifest), old, new, manifest, atol, rtol))


def via_store(capsys, tmp_path: Path, a: str, b: str, man: str | None, atol: float, rtol: float):
    """(TUI history verdicts, DIR@REF diff verdicts, log's drifted names, show's roles, history column counts)."""
    store = str(tmp_path / "store")
    for side in (a, b):
        assert main(["snapshot", side, "--store", store] + (["--manifest", man] if man else [])) == 0
    capsys.readouterr()
    model = HistoryModel.load(store)
    try:
        old, new = model.open(0), model.open(1)
        with old, new:
            history = verdicts(settle(model.quick_rows(1, 0), old, new, model.manifest(1, 0), atol, rtol))
        summary = model.summary(1, "first", None)
    finally:
        model.handle.close()
    refs = verdicts(ckptdiff.diff(f"{store}@first", f"{store}@latest", atol=atol, rtol=rtol).tensors)
    assert main(["log", store, "--format", "json"]) == 0
    log = json.loads(capsys.readouterr().out)["snapshots"][-1]["drifted_tensors"]
    assert main(["show", f"{store}@latest", "--format", "json"]) == 0
    roles = {t["name"]: t["role"] for t in json.loads(capsys.readouterr().out)["tensors"]}
    return history, refs, log, roles, summary


def synthetic_pair(tmp_path: Path) -> tuple[str, str, str]:
    """Every status, a buffer, a stale tensor, frozen changes inside and beyond the tolerance."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    old = {"enc.w": w, "enc.small": w[0].copy(), "enc.b": np.zeros(8, np.float32),
           "enc.cast": np.ones(3, np.float32), "enc.reshaped": np.ones((2, 3), np.float32),
           "bn.running_mean": np.zeros(8, np.float32), "head.w": np.ones(4, np.float32),
           "head.b": np.zeros(2, np.float32), "enc.gone": np.ones(2, np.float32)}
    new = {k: v.copy() for k, v in old.items() if k != "enc.gone"}
    new["enc.w"][1, 2] += 0.5                            # frozen, beyond the tolerance: drift
    new["enc.small"][3] += 1e-6                          # frozen, within it: changed, no drift
    new["enc.cast"] = np.ones(3, np.float16)             # frozen, retyped: drift
    new["enc.reshaped"] = np.ones((3, 2), np.float32)    # frozen, reshaped: drift
    new["bn.running_mean"] += 0.25                       # buffer: never drift
    new["head.w"] *= 2                                   # trainable, changed
    new["head.new"] = np.ones(1, np.float32)             # added
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(old, a)
    save_file(new, b)
    m = tmp_path / "synthetic.json"
    m.write_text(json.dumps({"trainable": ["head.*"], "frozen": ["enc.*"], "buffers": ["bn.*"]}))
    return a, b, str(m)


CASES = {
    # A fine-tune saved with its optimizer: the moments change and some vanish, none of them is drift.
    "optimizer state, explicit manifest": ("base.pt", "finetune_clean.pt", {"trainable": ["head.*"]}, 0.0, 0.0),
    "optimizer state, embedded manifest": ("base.pt", "finetune_drifted.pt", None, 0.0, 0.0),
    "drifted run, tolerance": ("base.pt", "finetune_drifted.pt", {"trainable": ["head.*"]}, 1e-3, 1e-3),
    "every status, buffers, tolerance": (None, None, None, 1e-4, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_view_gives_the_same_verdicts(case, tmp_path, capsys):
    a, b, man_dict, atol, rtol = CASES[case]
    if a is None:
        a, b, man = synthetic_pair(tmp_path)
    else:
        a, b = str(SAMPLES / a), str(SAMPLES / b)
        man = None
        if man_dict is not None:
            (tmp_path / "manifest.json").write_text(json.dumps(man_dict))
            man = str(tmp_path / "manifest.json")

    api = verdicts(ckptdiff.diff(a, b, manifest=man, atol=atol, rtol=rtol).tensors)
    assert via_cli(capsys, a, b, man, atol, rtol) == api
    assert via_tui_pair(a, b, man, atol, rtol) == api
    history, refs, log_drift, roles, summary = via_store(capsys, tmp_path, a, b, man, atol, rtol)
    assert history == api
    assert refs == api
    assert roles == {n: v[1] for n, v in api.items() if v[0] != "removed"}

    # log and the history columns judge by hash, at zero tolerance: the diff at zero tolerance
    exact = verdicts(ckptdiff.diff(a, b, manifest=man).tensors)
    assert sorted(log_drift) == sorted(n for n, v in exact.items() if v[2])
    assert (summary.drifted_vs_base, summary.stale_vs_base) == (
        sum(v[2] for v in exact.values()), sum(v[3] for v in exact.values()))

    # the cases are not vacuous: training state is a buffer, and tolerances decide something
    if a.endswith(".pt"):
        assert any(n.startswith("optimizer.") and v[0] != "identical" and v[1] == "buffer" and not v[2]
                   for n, v in api.items())
    if atol:
        assert any(v[1] == "frozen" and v[0] == "changed" and not v[2] for v in api.values())
        assert any(v[1] == "frozen" and v[2] for v in api.values())


def test_the_synthetic_pair_covers_every_status_and_role(tmp_path):
    a, b, man = synthetic_pair(tmp_path)
    got = verdicts(ckptdiff.diff(a, b, manifest=man, atol=1e-4).tensors)
    assert got == {
        "enc.w": ("changed", "frozen", True, False),
        "enc.small": ("changed", "frozen", False, False),
        "enc.b": ("identical", "frozen", False, False),
        "enc.cast": ("dtype_changed", "frozen", True, False),
        "enc.reshaped": ("shape_changed", "frozen", True, False),
        "bn.running_mean": ("changed", "buffer", False, False),
        "head.w": ("changed", "trainable", False, False),
        "head.b": ("identical", "trainable", False, True),
        "enc.gone": ("removed", "frozen", True, False),
        "head.new": ("added", "trainable", False, False),
    }
