"""Hostile names in every human-readable output: control characters, bidi overrides and markup
from a checkpoint never reach the terminal, and each tensor stays one visible line."""

from __future__ import annotations

import io
import json

import numpy as np
from safetensors.numpy import save_file

from ckptdiff import Checkpoint, Manifest
from ckptdiff import diff
from ckptdiff.render import render_github, render_markdown, render_table, verdict_line
from ckptdiff.textsafe import printable
from cli_helpers import ESC, HOSTILE, cli


def test_printable_escapes_controls_and_keeps_scripts():
    assert printable("evil\nname") == "evil\\nname"
    assert printable("esc\x1b[2J") == "esc\\x1b[2J"
    assert printable("rtl\u202eoverride") == "rtl\\u202eoverride"
    assert printable("ünïcødé.权重 emoji🔥") == "ünïcødé.权重 emoji🔥"
    assert printable("\x00\x7f\u0085") == "\\x00\\x7f\\x85"


def test_table_markdown_github_never_pass_control_characters(files, capsys):
    for fmt in ("table", "markdown", "github"):
        rc, out, err = cli(capsys, "diff", files["a"], files["b"], "--manifest", files["man"], "-f", fmt)
        assert rc == 1 and err == ""
        assert ESC not in out and "\r" not in out and "\t" not in out and "\u202e" not in out, fmt
        assert "evil\\nname" in out and "esc\\x1b[2Jclear" in out and "rtl\\u202eoverride" in out
        assert "ünïcødé.权重" in out and "emoji🔥.w" in out
    # table: one line per tensor plus header, title, summary and verdict (the long name folds)
    rc, out, _ = cli(capsys, "diff", files["a"], files["b"], "--manifest", files["man"])
    assert sum(1 for line in out.splitlines() if line.startswith("DRIFT")) == len(HOSTILE)
    # JSON keeps the exact names (the encoder escapes them)
    rc, out, _ = cli(capsys, "diff", files["a"], files["b"], "-f", "json")
    assert sorted(t["name"] for t in json.loads(out)["tensors"]) == sorted(HOSTILE)


def test_github_annotations_escape_per_github_rules(files, capsys):
    rc, out, _ = cli(capsys, "diff", files["a"], files["b"], "--manifest", files["man"], "-f", "github")
    lines = out.splitlines()
    # one annotation per drifted tensor, each one physical line, naming the NEW file
    anns = [line for line in lines if line.startswith("::error file=")]
    assert len(anns) == len(HOSTILE)
    pct = next(line for line in anns if "pct" in line)
    title, message = pct.split("::", 2)[1], pct.split("::", 2)[2]
    assert title == (f"error file={files['b']},title=ckptdiff%3A frozen tensor drifted%3A pct%250A%2Cx%3Ay")
    assert message.startswith("pct%250A,x:y is frozen but changed: max |delta| 0.5")
    assert all(line.count("::") == 2 for line in anns)


def test_github_file_property_is_escaped_and_absent_for_store_refs(tmp_path):
    odd = TensorDiffReport = diff(Checkpoint.from_arrays({"w": np.zeros(2)}, path="a.safetensors"),
                                  Checkpoint.from_arrays({"w": np.ones(2)}, path="dir,v1/m:1%.safetensors"),
                                  manifest=Manifest(trainable=("x",)))
    first = render_github(odd).splitlines()[0]
    assert first.startswith("::error file=dir%2Cv1/m%3A1%25.safetensors,title=ckptdiff%3A frozen tensor drifted%3A w::")
    st = Checkpoint.from_arrays({"w": np.ones(2)}, path="runs/store@abcd", format="store")
    rep = diff(Checkpoint.from_arrays({"w": np.zeros(2)}), st, manifest=Manifest(trainable=("x",)))
    assert render_github(rep).splitlines()[0].startswith("::error title=")
    del TensorDiffReport


def test_markdown_code_spans_show_names_verbatim():
    rep = diff(Checkpoint.from_arrays({"a`b|c": np.zeros(1), "`x": np.zeros(1), "u_v*w": np.zeros(1)}),
               Checkpoint.from_arrays({"a`b|c": np.ones(1), "`x": np.ones(1), "u_v*w": np.ones(1)}))
    md = render_markdown(rep)
    assert "| ``a`b\\|c`` |" in md  # longer fence, GFM pipe escape, name unchanged
    assert "| `` `x `` |" in md     # padded: the name starts with a backtick
    assert "| `u_v*w` |" in md       # no backslashes inside a code span


def test_paths_are_never_rich_markup(tmp_path, capsys):
    weird = tmp_path / "[bold red]m.safetensors"
    closing = tmp_path / "[" / "]x.safetensors"
    closing.parent.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(weird))
    save_file({"w": np.zeros(2, np.float32)}, str(closing))
    for path in (weird, closing):
        rc, out, err = cli(capsys, "diff", path, path)
        assert rc == 0 and err == ""
        assert out.splitlines()[0] == f"{path} -> {path}"


def test_store_show_and_log_keep_one_line_per_row(files, tmp_path, capsys):
    st = tmp_path / "st"
    rc, sid, err = cli(capsys, "snapshot", files["a"], "--store", st, "--message", "two\nlines\x1b[2J",
                       "--metric", "lo\nss=1")
    assert rc == 0, err
    rc, out, _ = cli(capsys, "show", f"{st}@latest")
    assert ESC not in out and "\r" not in out
    assert "message   two\\nlines\\x1b[2J" in out
    rows = out.split("\n\n", 1)[1].splitlines()
    assert len(rows) == 1 + len(HOSTILE)
    # columns stay aligned whatever the names: the dtype column starts at one offset
    # (a 300-character name runs over instead of pushing every other row right)
    from rich.cells import cell_len  # terminal columns: CJK and emoji take two
    starts = {cell_len(row[:row.index("float32")]) for row in rows[1:] if not row.startswith("aaaa")}
    assert len(starts) == 1 and starts.pop() <= 70
    rc, out, _ = cli(capsys, "log", st)
    assert "lo\\nss=1" in out and ESC not in out


def test_verdict_wording_singular_and_empty():
    one = diff(Checkpoint.from_arrays({"a": np.zeros(1)}), Checkpoint.from_arrays({"a": np.ones(1)}))
    assert verdict_line(one) == "FAIL: 1 tensor differs (--fail-on change)"
    one.fail_on = "never"
    assert verdict_line(one) == "PASS (--fail-on never): 1 tensor differs, 0 drifted"
    none = diff(Checkpoint.from_arrays({}), Checkpoint.from_arrays({}))
    assert verdict_line(none) == "PASS: no tensors to compare"


def test_narrow_terminal_drops_columns_instead_of_folding_names():
    arrays = {f"backbone.{i}.running_mean": np.zeros(4, np.float32) for i in range(3)}
    rep = diff(Checkpoint.from_arrays(arrays), Checkpoint.from_arrays({k: v + 1 for k, v in arrays.items()}))
    buf = io.StringIO()
    render_table(rep, buf, width=80)
    lines = buf.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if "backbone." in line]
    assert len(rows) == 3 and all("running_mean" in r for r in rows)  # names whole, not folded
    assert "max |Δ|" in lines[1] and "mean |Δ|" not in lines[1]
    assert any(line.startswith("(terminal too narrow for: ") and "mean |Δ|" in line for line in lines)
    wide = io.StringIO()
    render_table(rep, wide, width=160)
    assert "mean |Δ|" in wide.getvalue() and "too narrow" not in wide.getvalue()


def test_github_caps_change_annotations_and_says_how_many_more():
    old = {f"t{i:03d}": np.zeros(2, np.float32) for i in range(60)}
    rep = diff(Checkpoint.from_arrays(old, path="a.safetensors"),
               Checkpoint.from_arrays({k: v + 1 for k, v in old.items()}, path="b.safetensors"))
    lines = render_github(rep).splitlines()
    changed = [line for line in lines if line.startswith("::error file=b.safetensors,title=ckptdiff%3A tensor changed::")]
    assert len(changed) == 51
    assert changed[0].endswith("tensor t000 changed (max |Δ| 1, 2 of 2 elements)")
    assert changed[-1].endswith("…and 10 more changed tensors (run with --format json for all)")
    assert lines[-1] == "FAIL: 60 tensors differ (--fail-on change)"
