"""`ckptdiff diff` end to end: real files, exit codes 0/1/2, the JSON schema, formats, no torch import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff.cli import main

TENSOR_KEYS = {"name", "status", "role", "drift", "stale", "dtype_old", "dtype_new", "shape_old", "shape_new",
               "numel", "hash_old", "hash_new", "max_abs_delta", "mean_abs_delta", "rel_l2",
               "changed_elements", "nan_new", "inf_new", "out_of_tolerance", "cause", "cause_detail"}


@pytest.fixture()
def ckpts(tmp_path: Path) -> dict[str, Path]:
    """A base model, a clean fine-tune (head only) and a drifted one (a frozen weight moved by 4e-4)."""
    rng = np.random.default_rng(7)
    base = {"backbone.0.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "backbone.0.bias": np.zeros(16, np.float32),
            "head.weight": rng.standard_normal((4, 16)).astype(np.float32),
            "head.bias": np.zeros(4, np.float32)}
    clean = {k: v.copy() for k, v in base.items()}
    clean["head.weight"] += 0.25
    clean["head.bias"] += 0.5
    drifted = {k: v.copy() for k, v in clean.items()}
    drifted["backbone.0.weight"][2, 3] -= 0.0004
    out = {}
    for name, arrays in (("base", base), ("clean", clean), ("drifted", drifted)):
        out[name] = tmp_path / f"{name}.safetensors"
        save_file(arrays, str(out[name]))
    np.savez(tmp_path / "base.npz", **base)
    out["base_npz"] = tmp_path / "base.npz"
    out["manifest"] = tmp_path / "manifest.json"
    out["manifest"].write_text(json.dumps({"trainable": ["head.*"]}))
    return out


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---------------------------------------------------------------------------
# exit codes
# ---------------------------------------------------------------------------

def test_identical_files_exit_0(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["base"])
    assert rc == 0
    assert out.splitlines()[-1] == "PASS: all tensors are bitwise identical"


def test_same_weights_in_another_format_are_identical(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["base_npz"], "--format", "json")
    data = json.loads(out)
    assert rc == 0 and data["summary"]["identical"] == 4 and data["new"]["format"] == "npz"


def test_any_change_exits_1_without_manifest(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"])
    assert rc == 1 and "FAIL: 2 tensors differ (--fail-on change)" in out


def test_clean_finetune_passes_with_manifest(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "--manifest", ckpts["manifest"])
    assert rc == 0 and out.splitlines()[-1] == "PASS: no frozen tensor drifted"


def test_drift_exits_1_and_names_the_tensor(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"])
    assert rc == 1
    row = next(l for l in out.splitlines() if "backbone.0.weight" in l).split()
    assert row[:4] == ["DRIFT", "backbone.0.weight", "changed", "frozen"]
    assert row[-3:] == ["1/128", "(0.781%)", "sparse_rows"]  # one element: one row of 16
    assert out.splitlines()[-2] == ("backbone.0.weight drifted: 1 of 16 rows changed (row 2) — only a few rows moved "
                                    "(new token embeddings, a few classes of a head)")
    assert out.splitlines()[-1] == "FAIL: 1 frozen tensor drifted"


def test_tolerance_and_fail_on_never(ckpts, capsys):
    assert run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "--atol", "1e-3")[0] == 0
    assert run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "--atol", "1e-4")[0] == 1
    assert run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "--fail-on", "never")[0] == 0
    assert run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "-m", ckpts["manifest"], "--fail-on", "change")[0] == 1


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "directory", "bad_manifest", "missing_manifest"])
def test_trouble_exits_2_with_one_line(ckpts, capsys, tmp_path, case):
    args = [ckpts["base"], ckpts["clean"]]
    if case == "missing":
        args[1] = tmp_path / "nope.safetensors"
    elif case == "corrupt":
        bad = tmp_path / "bad.safetensors"
        data = ckpts["clean"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        args[1] = bad
    elif case == "empty":
        (tmp_path / "empty.bin").write_bytes(b"")
        args[1] = tmp_path / "empty.bin"
    elif case == "directory":
        (tmp_path / "somedir").mkdir()
        args[1] = tmp_path / "somedir"
    elif case == "bad_manifest":
        (tmp_path / "m.json").write_text("{\"trainable\": 3}")
        args += ["--manifest", tmp_path / "m.json"]
    elif case == "missing_manifest":
        args += ["--manifest", tmp_path / "none.json"]
    rc, out, err = run_cli(capsys, "diff", *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error: ") and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--atol", "-1"], ["--rtol", "nan"], ["--atol", "x"], ["--format", "yaml"],
                                   ["--fail-on", "sometimes"]])
def test_bad_flags_exit_2(ckpts, capsys, flags):
    assert main(["diff", str(ckpts["base"]), str(ckpts["clean"]), *flags]) == 2
    err = capsys.readouterr().err
    # one line, like every other error, pointing at the full usage
    assert err.count("\n") == 1 and err.startswith("ckptdiff: error: diff: argument ") and \
        err.endswith("(see 'ckptdiff diff --help')\n"), err


# ---------------------------------------------------------------------------
# JSON schema
# ---------------------------------------------------------------------------

def test_json_schema(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "-f", "json",
                         "--all")
    assert rc == 1
    data = json.loads(out)
    assert set(data) == {"schema", "old", "new", "manifest", "atol", "rtol", "fail_on", "summary",
                         "omitted_identical", "tensors", "verdict"}
    assert data["schema"] == "ckptdiff.diff/2" and data["omitted_identical"] == 0
    assert data["old"] == {"path": str(ckpts["base"]), "format": "safetensors", "tensors": 4,
                           "bytes": 4 * (128 + 16 + 64 + 4)}
    assert data["summary"] == {"identical": 1, "changed": 3, "added": 0, "removed": 0, "shape_changed": 0,
                               "dtype_changed": 0, "total": 4, "drifted": 1, "stale": 0}
    assert data["manifest"] == str(ckpts["manifest"]) and data["fail_on"] == "drift"
    assert data["verdict"]["failed"] is True
    assert data["verdict"]["reasons"] == [
        "frozen tensor backbone.0.weight changed (max |Δ| 0.0004, 1 of 128 elements)"]
    by_name = {t["name"]: t for t in data["tensors"]}
    assert all(set(t) == TENSOR_KEYS for t in data["tensors"])
    w = by_name["backbone.0.weight"]
    assert (w["status"], w["role"], w["drift"], w["stale"]) == ("changed", "frozen", True, False)
    assert (w["dtype_old"], w["shape_old"], w["numel"], w["changed_elements"]) == ("float32", [16, 8], 128, 1)
    assert w["max_abs_delta"] == pytest.approx(0.0004, abs=1e-7) and len(w["hash_old"]) == 64
    b = by_name["backbone.0.bias"]
    assert b["status"] == "identical" and b["max_abs_delta"] is None and b["hash_old"] == b["hash_new"]


@pytest.mark.parametrize("flags, hashed", [(("-f", "json", "--all"), True), (("-f", "json"), False),
                                           ((), False), (("--all",), False), (("-f", "markdown", "--all"), False)])
def test_identical_tensors_are_hashed_only_for_a_report_that_lists_them(ckpts, capsys, monkeypatch, flags, hashed):
    """Only JSON with --all shows identical tensors' hashes; other reports skip hashing unchanged bytes."""
    from ckptdiff import engine

    seen = []
    real = engine.diff

    def recording(*args, **kwargs):
        report = real(*args, **kwargs)
        seen.append(report)
        return report

    monkeypatch.setattr(engine, "diff", recording)
    run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], *flags)
    (report,) = seen
    bias = next(t for t in report.tensors if t.name == "backbone.0.bias")
    assert bias.status == "identical" and (bias.hash_old is not None) is hashed
    assert all(t.hash_old and t.hash_new for t in report.tensors if t.status == "changed")


def test_json_lists_identical_tensors_only_with_all(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "-f", "json")
    data = json.loads(out)
    assert rc == 1 and data["summary"]["identical"] == 1 and data["omitted_identical"] == 1
    assert sorted(t["name"] for t in data["tensors"]) == sorted(
        n for n in ("backbone.0.weight", "backbone.0.bias", "head.weight", "head.bias") if n != "backbone.0.bias")
    assert all(t["status"] != "identical" for t in data["tensors"])


def test_output_file(ckpts, capsys, tmp_path):
    target = tmp_path / "report.json"
    rc, out, err = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "-f", "json", "-o", target)
    assert rc == 1 and out == "" and err == ""
    assert json.loads(target.read_text())["summary"]["changed"] == 2
    md = tmp_path / "report.md"
    rc, out, err = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "-f", "markdown", "-o", md)
    assert md.read_text().startswith("### ckptdiff ❌ FAIL: 2 tensors differ") and err.startswith("report written")
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_output_to_stdout_and_bad_output_paths(ckpts, capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "-f", "json", "-o", "-")
    assert rc == 1 and json.loads(out)["schema"] == "ckptdiff.diff/2"
    cases = ((tmp_path / "no" / "r.json", "cannot write the report: its directory does not exist"),
             (tmp_path, "--output is a directory; name a file"))
    for target, msg in cases:
        rc, out, err = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "-o", target)
        assert (rc, out, err) == (2, "", f"ckptdiff: error: {target}: {msg}\n")


def test_markdown_and_github_formats(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "-f", "markdown")
    assert rc == 1 and "| 🔴 drift | `backbone.0.weight` | changed | frozen |" in out
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["drifted"], "-m", ckpts["manifest"], "-f", "github")
    assert rc == 1
    assert out.splitlines()[0].startswith(
        f"::error file={ckpts['drifted']},title=ckptdiff%3A frozen tensor drifted%3A backbone.0.weight::"
        "backbone.0.weight is frozen but changed")


def test_include_exclude_all_and_quiet(ckpts, capsys):
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "--include", "backbone.*", "-f", "json",
                         "--all")
    assert rc == 0 and sorted(t["name"] for t in json.loads(out)["tensors"]) == ["backbone.0.bias", "backbone.0.weight"]
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "--exclude", "head.*", "--exclude", "*.bias")
    assert rc == 0 and "(1 identical tensor hidden" in out
    rc, out, _ = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "--all")
    assert "backbone.0.bias" in out and "hidden" not in out
    rc, out, err = run_cli(capsys, "diff", ckpts["base"], ckpts["clean"], "-q")
    assert rc == 1 and out == "" and err == ""


def test_help_teaches(capsys):
    assert main(["diff", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("exit codes", "examples:", "--fail-on", "DRIFT", "STALE", "atol + rtol * |old|", "DIR@REF"):
        assert needle in text


# ---------------------------------------------------------------------------
# real subprocess: no torch, plain output off a terminal
# ---------------------------------------------------------------------------

def _subprocess(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    env.pop("CKPTDIFF_DEBUG", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("kind", ["base", "base_npz"])
def test_cli_does_not_import_torch(ckpts, kind):
    code = ("import sys; from ckptdiff.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    p = _subprocess("-c", code, "diff", str(ckpts[kind]), str(ckpts["drifted"]), "-m", str(ckpts["manifest"]),
                    "-f", "json")
    assert p.returncode == 1, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "NO-TORCH"
    # and by the import-time trace of the real module entry point
    p = _subprocess("-X", "importtime", "-m", "ckptdiff.cli", "diff", str(ckpts[kind]), str(ckpts["drifted"]))
    assert p.returncode == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "ckptdiff.engine" in imported and not any(m == "torch" or m.startswith("torch.") for m in imported)


def test_subprocess_table_has_no_colour_and_right_exit_code(ckpts):
    p = _subprocess("-m", "ckptdiff.cli", "diff", str(ckpts["base"]), str(ckpts["drifted"]), "-m", str(ckpts["manifest"]))
    assert p.returncode == 1 and "\x1b[" not in p.stdout and p.stderr == ""
    assert p.stdout.splitlines()[-1] == "FAIL: 1 frozen tensor drifted"
    p = _subprocess("-m", "ckptdiff.cli", "diff", str(ckpts["base"]), "/nonexistent/x.safetensors")
    assert p.returncode == 2 and p.stderr == "ckptdiff: error: /nonexistent/x.safetensors: no such file or directory\n"


def test_python_dash_m_ckptdiff_is_the_same_program(ckpts):
    p = _subprocess("-m", "ckptdiff", "diff", str(ckpts["base"]), str(ckpts["drifted"]), "-m", str(ckpts["manifest"]))
    assert p.returncode == 1 and p.stdout.splitlines()[-1] == "FAIL: 1 frozen tensor drifted"
    p = _subprocess("-m", "ckptdiff", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: ckptdiff ")


def _many_changed(tmp_path: Path, n: int = 3000) -> tuple[Path, Path]:
    """Two files whose JSON report is ~1 MB: more than a pipe holds, so the writer blocks on its reader."""
    a = {f"layer.{i}.weight": np.full(4, i, np.float32) for i in range(n)}
    b = {k: v + 1 for k, v in a.items()}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors"


def test_console_entry_flushes_every_byte_before_it_exits(tmp_path):
    a, b = _many_changed(tmp_path)
    p = _subprocess("-m", "ckptdiff", "diff", str(a), str(b), "-f", "json")  # stdout: a pipe
    assert p.returncode == 1 and p.stderr == ""
    doc = json.loads(p.stdout)
    assert doc["summary"]["changed"] == 3000 and len(doc["tensors"]) == 3000
    with open(tmp_path / "out.txt", "w") as f:  # stdout: a file, and the table
        p = subprocess.run([sys.executable, "-m", "ckptdiff", "diff", str(a), str(b)], stdout=f,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr == ""
    assert (tmp_path / "out.txt").read_text().splitlines()[-1] == "FAIL: 3000 tensors differ (--fail-on change)"


def test_console_entry_with_a_reader_that_stops_early_is_quiet(tmp_path):
    a, b = _many_changed(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "ckptdiff", "diff", str(a), str(b), "-f", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.read(10) == b'{\n  "schema'[:10]
    p.stdout.close()  # `| head -c 10`
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == b""


def test_console_entry_of_a_store_command_exits_normally(tmp_path, ckpts):
    store = tmp_path / "store"
    for argv in (["init", str(store)], ["snapshot", "--store", str(store), str(ckpts["base"]), "--step", "7"]):
        p = _subprocess("-m", "ckptdiff", *argv)
        assert p.returncode == 0, p.stderr
    p = _subprocess("-m", "ckptdiff", "log", str(store), "--format", "json")
    assert p.returncode == 0, p.stderr
    assert [s["step"] for s in json.loads(p.stdout)["snapshots"]] == [7]


def _run_in_pty(args: list[str], env_extra: dict[str, str]) -> tuple[int, str]:
    import pty
    import select
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env.update({"COLUMNS": "160", "TERM": "xterm-256color", **env_extra})
    p = subprocess.Popen([sys.executable, "-m", "ckptdiff.cli", *args], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return p.wait(timeout=60), out.decode("utf-8", "replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_on_a_terminal_progress_bar_and_colours(tmp_path):
    """On a real (pseudo-)terminal: a progress bar on a big diff, a red drift row; NO_COLOR turns colours off."""
    a = np.zeros(10 << 20, np.float32)  # 2 x 40 MiB: above the 64 MiB progress threshold
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": a + 1}, str(tmp_path / "b.safetensors"))
    (tmp_path / "m.json").write_text('{"frozen": ["w"]}')
    args = ["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-m", str(tmp_path / "m.json")]
    rc, out = _run_in_pty(args, {})
    assert rc == 1
    assert "diffing" in out and "83.9 MB" in out  # the transient rich bar, by bytes
    drift_line = next(l for l in out.splitlines() if "DRIFT" in l)
    assert "\x1b[31m" in drift_line or "\x1b[1;31m" in drift_line
    rc, out = _run_in_pty(args, {"NO_COLOR": "1"})
    assert rc == 1 and "DRIFT" in out
    assert not re.search(r"\x1b\[[0-9;]*3[0-9]m", out)
    rc, out = _run_in_pty([*args, "--no-progress"], {})
    assert rc == 1 and "diffing" not in out


def test_top_level_help_lists_the_environment(capsys):
    from ckptdiff.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for var in ("CKPTDIFF_DEBUG", "CKPTDIFF_HDF5_TIMEOUT", "CKPTDIFF_STATS"):
        assert var in out
    assert max(len(line) for line in out.splitlines()) <= 100
