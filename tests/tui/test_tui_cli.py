"""``ckptdiff tui``: argument checking, one-line errors, and the missing-Textual message."""

from __future__ import annotations

import os
import subprocess
import sys

from ckptdiff.cli import main


def one_error_line(capsys) -> str:  # type: ignore[no-untyped-def]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ckptdiff: error: ")
    return err[0]


def test_help_teaches_keys_and_modes(capsys) -> None:
    assert main(["tui", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("ckptdiff tui STORE", "OLD NEW", "drift", "pip install '.[tui]'", "is:drift",
                   "exit codes:"):
        assert needle in out


def test_missing_store_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["tui", str(tmp_path / "nope")]) == 2
    line = one_error_line(capsys)
    assert "nope" in line and "no such store" in line


def test_plain_directory_is_not_a_store(tmp_path, capsys) -> None:
    assert main(["tui", str(tmp_path)]) == 2
    assert "not a ckptdiff store" in one_error_line(capsys)


def test_single_checkpoint_file_explains_two_are_needed(pair_files, capsys) -> None:
    old, _, _ = pair_files
    assert main(["tui", old]) == 2
    assert "give two" in one_error_line(capsys)


def test_three_paths_rejected(pair_files, capsys) -> None:
    old, new, _ = pair_files
    assert main(["tui", old, new, old]) == 2
    assert "unrecognized arguments" in one_error_line(capsys)


def test_corrupt_checkpoint_fails_before_the_screen_changes(pair_files, capsys) -> None:
    old, new, _ = pair_files
    with open(new, "r+b") as f:
        f.truncate(40)
    assert main(["tui", old, new]) == 2
    assert new in one_error_line(capsys)


def test_bad_manifest_and_bad_tolerance(pair_files, capsys) -> None:
    old, new, _ = pair_files
    with open("bad.json", "w") as f:
        f.write("{nope")
    assert main(["tui", old, new, "--manifest", "bad.json"]) == 2
    assert "not valid JSON" in one_error_line(capsys)
    assert main(["tui", old, new, "--atol", "-1"]) == 2
    assert "argument --atol" in one_error_line(capsys)


def test_manifest_with_a_store_is_rejected(history, capsys) -> None:
    assert main(["tui", history.path, "--manifest", "m.json"]) == 2
    assert "two-checkpoint mode" in one_error_line(capsys)


def test_valid_inputs_start_the_app_in_the_right_mode(history, pair_files, monkeypatch) -> None:
    from ckptdiff.tui.app import CkptdiffApp

    started: list[CkptdiffApp] = []
    monkeypatch.setattr(CkptdiffApp, "run", lambda self, *a, **k: started.append(self))
    assert main(["tui", history.path]) == 0
    assert started[-1].store_path == history.path
    old, new, manifest = pair_files
    assert main(["tui", old, new, "--manifest", manifest, "--atol", "1e-3"]) == 0
    app = started[-1]
    assert (app.old, app.new, app.manifest_path, app.atol) == (old, new, manifest, 1e-3)


def test_missing_textual_gives_install_hint(history) -> None:
    """Run the CLI in a fresh interpreter where importing textual fails."""
    code = (
        "import sys; sys.modules['textual'] = None\n"
        "from ckptdiff.cli import main\n"
        f"sys.exit(main(['tui', {history.path!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.getcwd())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "ckptdiff: error: the TUI needs Textual, which is not installed: pip install 'textual>=0.80' "
        "(or, in a ckptdiff checkout, pip install '.[tui]')")
    assert "Traceback" not in proc.stderr


def test_cli_import_stays_free_of_textual() -> None:
    code = ("import sys\nfrom ckptdiff.cli import build_parser\nbuild_parser()\n"
            "print('textual' in sys.modules, 'ckptdiff.tui' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr
