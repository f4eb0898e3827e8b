"""Renderers: table, JSON, Markdown and GitHub annotations read a real engine report."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from ckptdiff import Checkpoint, Manifest
from ckptdiff import diff
from ckptdiff.render import (
    fmt_num,
    ordered,
    render,
    render_github,
    render_markdown,
    render_table,
    summary_line,
    verdict_line,
)
from ckptdiff.report import DiffReport, SideInfo, TensorDiff

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_report(**kw):
    old = {"enc.w": np.full(8, 0.1678, np.float32), "enc.b": np.zeros(4, np.float32),
           "head.w": np.ones(4, np.float32), "head.b": np.zeros(2, np.float32),
           "bn.running_var": np.ones(4, np.float32), "gone": np.zeros(3, np.float32)}
    new = {k: v.copy() for k, v in old.items() if k != "gone"}
    new["enc.w"][[1, 5]] = 0.1674
    new["head.w"] *= 2
    new["bn.running_var"] *= 0.9
    new["added|odd`name"] = np.ones(1, np.int8)
    man = Manifest(trainable=("head.*", "added*"), buffers=("*.running_*",), source="manifest.json")
    return diff(Checkpoint.from_arrays(old, path="base.safetensors"),
                Checkpoint.from_arrays(new, path="tuned.safetensors"), manifest=man, **kw)


def test_order_drift_then_stale_then_changes_identical_hidden():
    rep = make_report()
    names = [t.name for t in ordered(rep)]
    assert names == ["enc.w", "gone", "head.b", "head.w", "bn.running_var", "added|odd`name"]
    assert [t.name for t in ordered(rep, show_all=True)][-1] == "enc.b"


def test_verdict_and_summary_lines():
    rep = make_report()
    assert verdict_line(rep) == "FAIL: 2 frozen tensors drifted"
    assert summary_line(rep) == ("7 tensors: 2 identical, 3 changed, 1 added, 1 removed; "
                                 "2 drifted, 1 stale (manifest: manifest.json)")
    rep.fail_on = "never"
    assert verdict_line(rep).startswith("PASS (--fail-on never): 5 tensors differ, 2 drifted")
    assert verdict_line(rep).endswith("warning: 1 trainable tensor never changed")
    rep.fail_on = "change"
    assert verdict_line(rep) == "FAIL: 5 tensors differ (--fail-on change)"
    same = diff(Checkpoint.from_arrays({"a": np.ones(2)}), Checkpoint.from_arrays({"a": np.ones(2)}))
    assert verdict_line(same) == "PASS: all tensors are bitwise identical"
    assert "no manifest" in summary_line(same)


def test_identical_sides_are_not_a_stale_warning():
    """A snapshot diffed against the file it came from: same content by design, not an alarm."""
    arrays = {"enc.w": np.ones(3, np.float32), "head.w": np.zeros(2, np.float32)}
    man = Manifest(trainable=("head.*",))
    same = diff(Checkpoint.from_arrays(arrays), Checkpoint.from_arrays(dict(arrays)), manifest=man)
    assert same.summary()["stale"] == 1
    assert verdict_line(same) == ("PASS: no frozen tensor drifted; the two sides are bitwise identical, "
                                  "so no trainable tensor changed either")
    moved = diff(Checkpoint.from_arrays(arrays), Checkpoint.from_arrays({**arrays, "enc.w": np.zeros(3, np.float32)}),
                 manifest=man)
    assert verdict_line(moved) == "FAIL: 1 frozen tensor drifted"
    moved.fail_on = "never"
    assert verdict_line(moved).endswith("; warning: 1 trainable tensor never changed")


def test_fmt_num():
    assert [fmt_num(x) for x in (None, 0.0, float("inf"), float("nan"), 0.00040001, 1234567.0)] == \
        ["-", "0", "inf", "nan", "0.0004", "1.235e+06"]
    assert [fmt_num(x) for x in (-0.0, float("-inf"), -float("nan"), -2.5e-7)] == ["0", "-inf", "nan", "-2.5e-07"]


def test_shapes_read_the_same_from_lists_tuples_and_the_cache():
    from ckptdiff import display

    for s, text in (([2, 3], "(2, 3)"), ((8,), "(8,)"), ([], "()"), (None, "-"), ([np.int64(4), 5], "(4, 5)")):
        assert display.shape(s) == display.shape(s) == text
    row = TensorDiff(name="w", status="shape_changed", shape_old=[2, 3], shape_new=[3, 2])
    assert display.shape_of(row) == "(2, 3)->(3, 2)"
    row = TensorDiff(name="w", status="removed", shape_old=[4])
    assert display.shape_of(row) == "(4,)"
    for i in range(display._SHAPE_TEXT_MAX + 10):  # all-different shapes: the cache stops growing
        assert display.shape([i, 1]) == f"({i}, 1)"
    assert len(display._SHAPE_TEXT) <= display._SHAPE_TEXT_MAX


def test_markdown_for_pr_comments():
    md = render_markdown(make_report())
    lines = md.splitlines()
    assert lines[0] == "### ckptdiff ❌ FAIL: 2 frozen tensors drifted"
    assert "`base.safetensors` → `tuned.safetensors` · manifest: `manifest.json` · atol 0 · rtol 0 · fail on drift" in md
    assert "| 2 | 3 | 1 | 1 | 0 | 0 | **2** | 1 |" in md
    drift_row = next(l for l in lines if "`enc.w`" in l)
    assert drift_row.startswith("| 🔴 drift | `enc.w` | changed | frozen | float32 | (8,) | 0.0004 |")
    assert "2/8 (25%)" in drift_row
    assert any(l.startswith("| 🔴 drift | `gone` | removed | frozen") for l in lines)
    assert any(l.startswith("| 🟡 stale | `head.b` | identical | trainable") for l in lines)
    # a '|' in a tensor name must not break the table; a backtick in it gets a longer
    # fence (CommonMark) so the name is shown verbatim instead of being altered
    assert "``added\\|odd`name``" in md
    assert "1 identical tensor not shown." in md
    assert "`enc.b`" not in md
    assert "`enc.b`" in render_markdown(make_report(), show_all=True)


def test_markdown_caps_rows():
    arrays = {f"t{i}": np.full(2, i, np.float32) for i in range(30)}
    rep = diff(Checkpoint.from_arrays(arrays), Checkpoint.from_arrays({k: v + 1 for k, v in arrays.items()}))
    md = render_markdown(rep, max_rows=10)
    assert sum(1 for l in md.splitlines() if l.startswith("|  | `t")) == 10
    assert "…and 20 more rows" in md


def test_github_annotations():
    out = render_github(make_report()).splitlines()
    # per-tensor annotations name the NEW checkpoint as their file
    assert out[0] == ("::error file=tuned.safetensors,title=ckptdiff%3A frozen tensor drifted%3A enc.w::enc.w is "
                      "frozen but changed: max |delta| 0.0004, rel L2 0.001192, 2 of 8 elements differ; "
                      "cause: an update with no simpler pattern — gradients or an optimizer reach it: "
                      "it is being trained")
    assert out[1] == ("::error file=tuned.safetensors,title=ckptdiff%3A frozen tensor drifted%3A gone::gone is "
                      "frozen but removed")
    assert out[2].startswith("::warning file=tuned.safetensors,title=ckptdiff%3A trainable tensor never updated%3A "
                             "head.b::head.b is trainable")
    assert out[3].startswith("::error title=ckptdiff::FAIL: 2 frozen tensors drifted | 7 tensors")
    assert out[-1] == "FAIL: 2 frozen tensors drifted"
    assert sum(l.startswith("::error") for l in out) == 3


def test_github_escapes_workflow_command_syntax():
    td = TensorDiff(name="a:b,c%d\nx", status="removed", role="frozen", drift=True, shape_old=[1], dtype_old="int8")
    rep = DiffReport(SideInfo("o", "m", 1, 1), SideInfo("n", "m", 0, 0), [td], manifest_source="m", fail_on="drift")
    first = render_github(rep).splitlines()[0]
    # the name's LF is made visible (\n) before GitHub's escaping, so it cannot start a new command
    assert first == ("::error file=n,title=ckptdiff%3A frozen tensor drifted%3A a%3Ab%2Cc%25d\\nx::"
                     "a:b,c%25d\\nx is frozen but removed")


def test_github_change_policy_without_manifest_annotates_changes():
    rep = diff(Checkpoint.from_arrays({"a": np.ones(2)}), Checkpoint.from_arrays({"a": np.zeros(2)}))
    out = render_github(rep)
    assert "::error title=ckptdiff%3A tensor changed::tensor a changed (max |Δ| 1" in out
    ok = diff(Checkpoint.from_arrays({"a": np.ones(2)}), Checkpoint.from_arrays({"a": np.ones(2)}))
    assert render_github(ok).splitlines()[0].startswith("::notice title=ckptdiff::PASS")


def test_table_plain_when_not_a_terminal():
    buf = io.StringIO()
    render_table(make_report(), buf)
    text = buf.getvalue()
    assert not ANSI.search(text)
    lines = text.splitlines()
    assert lines[0] == "base.safetensors -> tuned.safetensors"
    header = lines[1].split()
    assert header == ["tensor", "status", "role", "dtype", "shape", "max", "|Δ|", "mean", "|Δ|", "rel", "L2", "changed", "cause"]
    assert lines[2].split()[:3] == ["DRIFT", "enc.w", "changed"]
    assert lines[3].split()[:3] == ["DRIFT", "gone", "removed"]
    assert lines[4].split()[:3] == ["STALE", "head.b", "identical"]
    assert "(1 identical tensor hidden; --all shows them)" in text
    assert lines[-1] == "FAIL: 2 frozen tensors drifted"


def test_table_colours_drift_red_and_stale_yellow(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    buf = io.StringIO()
    render_table(make_report(), buf, color=True, width=200)
    lines = buf.getvalue().splitlines()
    drift = next(l for l in lines if "enc.w" in l)
    stale = next(l for l in lines if "head.b" in l)
    assert "\x1b[31m" in drift or "\x1b[1;31m" in drift
    assert "\x1b[33m" in stale or "\x1b[1;33m" in stale
    changed = next(l for l in lines if "head.w" in l)
    assert "31m" not in changed and "33m" not in changed


def test_table_honours_no_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    buf = io.StringIO()
    render_table(make_report(), buf, color=True, width=200)
    assert not re.search(r"\x1b\[[0-9;]*3[13]m", buf.getvalue())


def test_render_json_is_standard_json():
    a = Checkpoint.from_arrays({"z": np.zeros(2, np.float32)})
    b = Checkpoint.from_arrays({"z": np.array([0, 1], np.float32)})
    buf = io.StringIO()
    render(diff(a, b), "json", buf)
    data = json.loads(buf.getvalue())
    assert data["tensors"][0]["rel_l2"] == "inf"
    with pytest.raises(ValueError):
        render(diff(a, b), "yaml", buf)


def test_frozen_change_within_tolerance_is_shown_but_not_failed():
    rep = make_report(atol=1e-3)
    enc = next(t for t in rep.tensors if t.name == "enc.w")
    assert enc.status == "changed" and not enc.drift and enc.out_of_tolerance == 0
    buf = io.StringIO()
    render_table(rep, buf)
    row = next(l for l in buf.getvalue().splitlines() if "enc.w" in l)
    assert row.split()[:3] == ["<=tol", "enc.w", "changed"]
    assert "| ≤ tol | `enc.w` | changed | frozen |" in render_markdown(rep)
    assert verdict_line(rep) == "FAIL: 1 frozen tensor drifted"  # 'gone' was removed: still drift
