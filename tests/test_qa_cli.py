"""QA as a new user: every command's help, bad input on every command, hostile names in every output.

Each test here pins a bug found by running the documented commands the way a
first-time user would: one line on stderr and exit 2 for trouble, no
traceback, no terminal escape sequences from a checkpoint reaching the
terminal, nothing written when a command refuses.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff import Checkpoint, Manifest
from ckptdiff.cli import main
from ckptdiff import diff
from ckptdiff.errors import CkptError
from ckptdiff.render import render_github, render_markdown, render_table, verdict_line
from ckptdiff.store import Store
from ckptdiff.textsafe import printable

#: Names a hostile (or just odd) checkpoint may hold.
HOSTILE = ["evil\nname", "cr\rname", "esc\x1b[2Jclear", "rtl\u202eoverride", "tab\tname", "pct%0A,x:y",
           "pipe|back`tick", "ünïcødé.权重", "emoji🔥.w", "a" * 300]
ESC = "\x1b"


def cli(capsys, *args: object) -> tuple[int, str, str]:
    rc = main([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptdiff: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    a = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in HOSTILE}
    b = {n: v.copy() for n, v in a.items()}
    for v in b.values():
        v[0, 0] += np.float32(0.5)
    out = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors",
           "x": tmp_path / "x.safetensors", "y": tmp_path / "y.safetensors",
           "empty": tmp_path / "empty.safetensors", "empty_npz": tmp_path / "empty.npz",
           "man": tmp_path / "man.json"}
    save_file(a, str(out["a"]))
    save_file(b, str(out["b"]))
    save_file({"x": np.arange(3, dtype=np.float32)}, str(out["x"]))
    save_file({"y": np.arange(3, dtype=np.float32)}, str(out["y"]))
    save_file({}, str(out["empty"]))
    np.savez(out["empty_npz"])
    out["man"].write_text(json.dumps({"trainable": ["nothing"]}))
    return out


# ---------------------------------------------------------------------------
# help and usage errors
# ---------------------------------------------------------------------------

COMMANDS = ("diff", "init", "snapshot", "log", "show", "export", "verify", "rm", "gc", "tui")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_help_teaches_examples_and_exit_codes(capsys, cmd):
    rc, out, _ = cli(capsys, cmd, "--help")
    assert rc == 0
    assert re.search(r"\nexamples?:\n", out) and "\nexit codes" in out, out
    examples = re.split(r"\nexamples?:\n", out, maxsplit=1)[1]
    assert examples.lstrip().startswith(f"ckptdiff {cmd} ")  # the examples are runnable commands
    # every positional argument is explained, not just named
    positional = out.split("positional arguments:", 1)[1].split("options:", 1)[0]
    assert all(len(line.split()) > 1 for line in positional.strip().splitlines() if line.startswith("  ")
               and not line.startswith("    ")), positional


def test_no_arguments_prints_the_command_list_and_exits_2(capsys):
    rc, out, err = cli(capsys)
    assert rc == 2 and out == ""
    assert "diff" in err and "snapshot" in err and "Exit codes" in err


@pytest.mark.parametrize("args,needle", [
    (["diff", "only-one.safetensors"], "the following arguments are required: NEW"),
    (["diff", "a", "b", "--atol", "x"], "argument --atol: not a number: 'x'"),
    (["diff", "a", "b", "--format", "yaml"], "argument --format/-f: invalid choice"),
    (["snapshot", "a", "--store", "s", "--step", "abc"], "argument --step: expected a whole number, got 'abc'"),
    (["snapshot", "a", "--store", "s", "--step", "-5"], "argument --step: must be from 0 to 2^63-1, got -5"),
    (["snapshot", "a", "--store", "s", "--step", str(2**64)], "argument --step: must be from 0"),
    (["gc", "s", "--keep-last", "-1"], "argument --keep-last: must be 0 or more"),
    (["gc", "s", "--keep-last", "many"], "argument --keep-last: expected a whole number"),
    (["tui", "a", "b", "c"], "unrecognized arguments: c"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_usage_errors_are_one_line_naming_the_help(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, *args)
    assert rc == 2 and out == ""
    line = one_error(err)
    assert needle in line
    assert line.endswith("--help')")
    assert not os.path.exists("s")  # nothing was created


# ---------------------------------------------------------------------------
# hostile names: every human-readable output stays one visible line per tensor
# ---------------------------------------------------------------------------

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


def test_error_messages_stay_one_line(tmp_path, capsys):
    bad = tmp_path / "evil\nname\x1b[2J.safetensors"
    rc, out, err = cli(capsys, "diff", bad, bad)
    assert rc == 2 and ESC not in err
    assert one_error(err).endswith("evil\\nname\\x1b[2J.safetensors: no such file or directory")


# ---------------------------------------------------------------------------
# diff edge cases
# ---------------------------------------------------------------------------

def test_include_that_matches_nothing_is_an_error(files, capsys):
    rc, out, err = cli(capsys, "diff", files["x"], files["x"], "--include", "enc*")
    assert rc == 2 and out == ""
    assert "--include 'enc*' selected none of the tensors (1 in OLD, 1 in NEW)" in one_error(err)
    # two empty checkpoints are not a selection mistake: a normal, honest pass
    rc, out, err = cli(capsys, "diff", files["empty"], files["empty_npz"], "--include", "enc*")
    assert rc == 0 and out.splitlines()[-1] == "PASS: no tensors to compare"


def test_empty_disjoint_self_and_symlink(files, tmp_path, capsys):
    rc, out, _ = cli(capsys, "diff", files["empty"], files["empty_npz"])
    assert rc == 0 and out.splitlines()[-2:] == [
        "0 tensors: none compared; no manifest (roles unknown, drift not checked)", "PASS: no tensors to compare"]
    rc, out, _ = cli(capsys, "diff", files["x"], files["empty"], "-f", "json")
    rep = json.loads(out)
    assert rc == 1 and [(t["name"], t["status"]) for t in rep["tensors"]] == [("x", "removed")]
    rc, out, _ = cli(capsys, "diff", files["x"], files["empty"])
    assert out.splitlines()[-1] == "FAIL: 1 tensor differs (--fail-on change)"
    rc, out, _ = cli(capsys, "diff", files["x"], files["y"], "-f", "json")
    assert rc == 1 and {t["name"]: t["status"] for t in json.loads(out)["tensors"]} == {"x": "removed", "y": "added"}
    link = tmp_path / "link.safetensors"
    link.symlink_to(files["x"])
    rc, out, _ = cli(capsys, "diff", files["x"], link, "-f", "json")
    rep = json.loads(out)
    assert rc == 0 and rep["summary"]["identical"] == 1 and rep["tensors"][0]["hash_old"] == rep["tensors"][0]["hash_new"]


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


def test_store_ref_to_a_non_store_or_empty_ref(files, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    rc, _, err = cli(capsys, "diff", f"{plain}@latest", files["x"])
    assert rc == 2 and f"{plain}: is not a ckptdiff store, so '{plain}@latest' names no snapshot" in one_error(err)
    rc, _, err = cli(capsys, "diff", f"{files['x']}@latest", files["x"])
    assert rc == 2 and "is not a ckptdiff store" in one_error(err)
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    for cmd in (["diff", f"{st}@", files["x"]], ["show", f"{st}@"], ["export", f"{st}@", tmp_path / "o.safetensors"],
                ["rm", f"{st}@"]):
        rc, _, err = cli(capsys, *cmd)
        assert rc == 2 and "nothing after '@'" in one_error(err), cmd
    for cmd in ("log", "verify", "gc"):
        rc, _, err = cli(capsys, cmd, f"{st}@latest")
        assert rc == 2 and "takes a store directory, not DIR@REF" in one_error(err)


# ---------------------------------------------------------------------------
# store commands: refusals leave everything as it was
# ---------------------------------------------------------------------------

def test_init_with_an_empty_name_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for name in ("", " "):
        rc, _, err = cli(capsys, "init", name)
        assert rc == 2 and "the store directory name is empty" in one_error(err)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    with pytest.raises(CkptError, match="empty"):
        Store.open("", create=True)


def test_rm_needs_an_explicit_ref(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    rc, _, err = cli(capsys, "rm", st)
    assert rc == 2 and "name the snapshot to remove as DIR@REF" in one_error(err)
    with Store.open(st) as s:
        assert len(s.list()) == 1
    rc, out, _ = cli(capsys, "rm", f"{st}@latest")
    assert rc == 0 and out.startswith("removed snapshot ")


@pytest.mark.parametrize("tag,why", [
    ("", "cannot be empty"), (" best", "leading or trailing spaces"), ("latest", "reserved"), ("first", "reserved"),
    ("latest~3", "reserved"), ("step:5", "reserved"), ("a@b", "contains '@'"), ("a\tb", "control"),
    ("x" * 201, "limit is 200"),
])
def test_unreachable_tags_are_refused(files, tmp_path, capsys, tag, why):
    st = tmp_path / "st"
    rc, out, err = cli(capsys, "snapshot", files["x"], "--store", st, "--tag", tag)
    assert rc == 2 and out == "" and why in one_error(err)
    assert not st.exists()  # refused before the store was created
    with Store.open(st, create=True) as s, Checkpoint.from_arrays({"w": np.zeros(1)}) as ck:
        with pytest.raises(CkptError, match=re.escape(why)):
            s.snapshot(ck, tag=tag)
        assert s.list() == []


def test_tags_that_work_as_refs(files, tmp_path, capsys):
    st = tmp_path / "st"
    for tag in ("best", "phase1-done", "v1.0", "cafe", "权重"):
        assert cli(capsys, "snapshot", files["x"], "--store", st, "--tag", tag)[0] == 0
        rc, out, _ = cli(capsys, "show", f"{st}@{tag}", "--format", "json")
        assert rc == 0 and json.loads(out)["tag"] == tag


def test_store_api_checks_step_range(tmp_path):
    with Store.open(tmp_path / "st", create=True) as s, Checkpoint.from_arrays({"w": np.zeros(1)}) as ck:
        for bad in (-1, 2**63, 10**30):
            with pytest.raises(CkptError, match="step must be a whole number from 0"):
                s.snapshot(ck, step=bad)
        sid = s.snapshot(ck, step=2**63 - 1)
        assert s.resolve(f"step:{2**63 - 1}").id == sid


def test_metrics_given_twice_or_without_value(files, tmp_path, capsys):
    st = tmp_path / "st"
    for metrics, why in ((["loss=1", "loss=2"], "--metric loss is given twice (1 and 2)"),
                         (["loss="], "--metric loss has no value"),
                         (["=3"], "expects KEY=VALUE")):
        args = [a for m in metrics for a in ("--metric", m)]
        rc, _, err = cli(capsys, "snapshot", files["x"], "--store", st, *args)
        assert rc == 2 and why in one_error(err)
    assert not st.exists()
    rc, _, _ = cli(capsys, "snapshot", files["x"], "--store", st, "--metric", "loss=nan", "--metric", "acc=inf")
    assert rc == 0
    rc, out, _ = cli(capsys, "log", st, "--format", "json")
    assert json.loads(out)["snapshots"][0]["metrics"] == {"loss": "nan", "acc": "inf"}


def test_export_refuses_a_name_promising_another_format(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    for name in ("o.npz", "o.h5", "o.npy"):
        rc, _, err = cli(capsys, "export", f"{st}@latest", tmp_path / name)
        assert rc == 2 and "export writes .safetensors or .pt files" in one_error(err)
        assert not (tmp_path / name).exists()
    rc, _, _ = cli(capsys, "export", f"{st}@latest", tmp_path / "o.npz", "--format", "safetensors")
    assert rc == 0
    rc, out, _ = cli(capsys, "diff", tmp_path / "o.npz", files["x"], "-f", "json")
    assert rc == 0 and json.loads(out)["summary"]["identical"] == 1
    # over an existing file: refused, the file untouched; --force replaces it
    before = (tmp_path / "o.npz").read_bytes()
    rc, _, err = cli(capsys, "export", f"{st}@latest", tmp_path / "o.npz", "--format", "safetensors")
    assert rc == 2 and "already exists (pass --force to overwrite)" in one_error(err)
    assert (tmp_path / "o.npz").read_bytes() == before


def test_output_never_replaces_a_checkpoint(files, tmp_path, capsys):
    before = files["a"].read_bytes()
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-o", files["a"])
    assert rc == 2 and "names one of the inputs (OLD, NEW or --manifest)" in one_error(err)
    man_before = files["man"].read_text()
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-m", files["man"], "-f", "json", "-o", files["man"])
    assert rc == 2 and "names one of the inputs" in one_error(err) and files["man"].read_text() == man_before
    other = tmp_path / "other.bin"
    other.write_bytes(files["x"].read_bytes())
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-f", "json", "-o", other)
    assert rc == 2 and "is an existing safetensors checkpoint; refusing to overwrite it" in one_error(err)
    assert files["a"].read_bytes() == before and other.read_bytes() == files["x"].read_bytes()
    # an earlier report is replaced, as -o promises
    report = tmp_path / "r.json"
    report.write_text("old report")
    rc, out, err = cli(capsys, "diff", files["a"], files["b"], "-f", "json", "-o", report)
    assert rc == 1 and json.loads(report.read_text())["summary"]["changed"] == len(HOSTILE)


def test_compress_on_an_existing_store_is_noted_not_ignored_silently(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "init", st)[0] == 0
    rc, out, err = cli(capsys, "snapshot", files["x"], "--store", st, "--compress")
    assert rc == 0 and len(out.strip()) == 16
    assert err.startswith("ckptdiff: note: --compress ignored:") and err.count("\n") == 1


def test_verify_reports_damaged_snapshot_metadata_and_tui_refuses_early(files, tmp_path, capsys):
    import sqlite3

    st = tmp_path / "st"
    for step in (1, 2):
        assert cli(capsys, "snapshot", files["x"], "--store", st, "--step", str(step), "--metric", "loss=1",
                   "--manifest", files["man"])[0] == 0
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 0 and out.startswith("ok: ")
    with sqlite3.connect(st / "ckptdiff.db") as c:
        c.execute("UPDATE snapshots SET manifest = '{not json' WHERE step = 1")
        c.execute("UPDATE snapshots SET metrics = '[1, 2' WHERE step = 2")
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].startswith("ERROR snapshot ") and "manifest in the database is damaged" in lines[0]
    assert "metrics in the database are damaged" in lines[1]
    assert lines[-1].startswith("FAILED: ") and "2 other problems" in lines[-1]
    rc, out, _ = cli(capsys, "verify", st, "--format", "json")
    assert rc == 1 and len(json.loads(out)["errors"]) == 2
    rc, out, err = cli(capsys, "log", st)
    assert rc == 2 and "manifest in the store database is damaged" in one_error(err)
    rc, out, err = cli(capsys, "tui", st)  # refused before the screen switches
    assert rc == 2 and "manifest in the store database is damaged" in one_error(err)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_works_before_or_after_the_command(files, capsys, where):
    args = ["diff", os.fspath(files["x"]) + ".missing", os.fspath(files["x"])]
    argv = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(CkptError, match="no such file"):
        main(argv)
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "no such file" in one_error(err)


@pytest.mark.parametrize("content,why", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"trainable": [' + "1" * 5000 + "]}", "Exceeds the limit"),
    (b"\x89HDF\r\n\x1a\n\x00\x00", "not UTF-8 text: is it a checkpoint?"),
])
def test_hostile_manifest_json_is_one_clear_error(files, tmp_path, capsys, content, why):
    man = tmp_path / "m.json"
    if isinstance(content, bytes):
        man.write_bytes(content)
    else:
        man.write_text(content)
    for args in (["diff", files["x"], files["x"], "-m", man], ["snapshot", files["x"], "--store", tmp_path / "s",
                                                              "--manifest", man]):
        rc, _, err = cli(capsys, *args)
        line = one_error(err)
        assert rc == 2 and why in line and "internal error" not in line


def test_hostile_json_inside_a_store_database(files, tmp_path, capsys):
    import sqlite3

    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st, "--manifest", files["man"], "--metric", "a=1")[0] == 0
    deep = "[" * 100_000 + "]" * 100_000
    with sqlite3.connect(st / "ckptdiff.db") as c:
        c.execute("UPDATE snapshots SET manifest = ?, metrics = ?", (deep, deep))
    for args in (["log", st], ["show", f"{st}@latest"], ["diff", f"{st}@latest", files["x"]]):
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and "manifest in the store database is damaged" in one_error(err)
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 1 and "manifest in the database is damaged" in out and "metrics in the database are damaged" in out
    with sqlite3.connect(st / "ckptdiff.db") as c:
        c.execute("UPDATE snapshots SET manifest = NULL")
        c.execute("UPDATE entries SET shape = ?", (deep,))
    rc, _, err = cli(capsys, "show", f"{st}@latest")
    assert rc == 2 and "damaged shape in the store database" in one_error(err)


def test_unwritable_destinations_are_one_line_and_leave_nothing(files, tmp_path, unprivileged):
    """Export, -o, init and snapshot into a read-only directory (root runs without the bypass capabilities)."""
    import subprocess
    import sys

    prefix = unprivileged
    st = tmp_path / "st"
    assert main(["snapshot", os.fspath(files["x"]), "--store", os.fspath(st)]) == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    env.pop("CKPTDIFF_DEBUG", None)
    cases = [
        (["export", f"{st}@latest", f"{ro}/x.safetensors"], "cannot write the export: Permission denied"),
        (["diff", os.fspath(files["x"]), os.fspath(files["x"]), "-o", f"{ro}/r.json"],
         "cannot write the report: directory is not writable"),
        (["init", f"{ro}/new"], "cannot create the store here (Permission denied)"),
        (["snapshot", os.fspath(files["x"]), "--store", f"{ro}/new"], "cannot create the store here"),
    ]
    try:
        for args, why in cases:
            r = subprocess.run([*prefix, sys.executable, "-m", "ckptdiff.cli", *args], capture_output=True,
                               text=True, env=env, timeout=60)
            assert r.returncode == 2 and r.stdout == "", (args, r.stderr)
            assert why in one_error(r.stderr), r.stderr
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


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


def test_reports_and_exports_never_land_in_a_stores_own_files(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    blob = next((st / "blobs").iterdir())
    db_before, blob_before = (st / "ckptdiff.db").read_bytes(), blob.read_bytes()
    for target in (st / "ckptdiff.db", blob, st / "blobs" / "new.json", st / "tmp" / "r.json", st / "gc.lock"):
        rc, _, err = cli(capsys, "diff", files["x"], files["x"], "-f", "json", "-o", target)
        assert rc == 2 and "refusing to write the report there" in one_error(err), target
        rc, _, err = cli(capsys, "export", f"{st}@latest", target, "--force", "--format", "safetensors")
        assert rc == 2 and "is one of the store's own files" in one_error(err), target
    assert (st / "ckptdiff.db").read_bytes() == db_before and blob.read_bytes() == blob_before
    assert not (st / "blobs" / "new.json").exists() and not (st / "tmp" / "r.json").exists()
    rc, out, _ = cli(capsys, "verify", st)
    assert rc == 0 and out.startswith("ok: ")
    # beside the store's files is fine
    rc, _, _ = cli(capsys, "export", f"{st}@latest", st / "model.safetensors")
    assert rc == 0


def test_a_snapshot_with_no_tensors(files, tmp_path, capsys):
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["empty"], "--store", st)[0] == 0
    rc, out, _ = cli(capsys, "show", f"{st}@latest")
    assert rc == 0 and "tensors   0 (0 B)" in out and out.rstrip().endswith("(no tensors)")
    for name in ("e.safetensors", "e.pt"):
        assert cli(capsys, "export", f"{st}@latest", tmp_path / name)[0] == 0
    rc, out, _ = cli(capsys, "diff", tmp_path / "e.pt", tmp_path / "e.safetensors")
    assert rc == 0 and out.splitlines()[-1] == "PASS: no tensors to compare"


def test_dash_m_means_manifest_in_snapshot_as_in_diff(files, tmp_path, capsys):
    st = tmp_path / "st"
    rc, _, err = cli(capsys, "snapshot", files["x"], "--store", st, "-m", files["man"])
    assert rc == 0, err
    rc, out, _ = cli(capsys, "show", f"{st}@latest", "--format", "json")
    shown = json.loads(out)
    assert shown["manifest"]["trainable"] == ["nothing"] and shown["message"] is None
