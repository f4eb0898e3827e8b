"""Every command's help and usage errors: examples and exit codes in the help, one line on stderr
and exit 2 for trouble, whatever the arguments or their order."""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest

from ckptdiff.cli import COMMAND_MODULES, build_parser, main
from ckptdiff.errors import CkptError
from cli_helpers import ESC, cli, one_error


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


def _commands(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_the_command_table_names_what_each_module_registers():
    """main() builds only the named command's module; the table that picks it must be complete and right."""
    assert set(_commands(build_parser()).choices) == set(COMMAND_MODULES)
    for name, module in COMMAND_MODULES.items():
        built = _commands(build_parser(name)).choices
        assert name in built
        assert {COMMAND_MODULES[n] for n in built} == {module}, name


@pytest.mark.parametrize("cmd", sorted(COMMAND_MODULES))
def test_a_command_built_alone_has_the_full_parsers_help(cmd):
    full, alone = _commands(build_parser()).choices[cmd], _commands(build_parser(cmd)).choices[cmd]
    assert alone.format_help() == full.format_help()
    assert alone.format_usage() == full.format_usage()


@pytest.mark.parametrize("argv", [["--help"], ["--debug", "-h"], ["-h", "diff"], ["--deb", "-h"]])
def test_help_before_the_command_lists_every_command(capsys, argv):
    rc, out, _ = cli(capsys, *argv)
    assert rc == 0
    assert all(name in out for name in COMMAND_MODULES) and "Exit codes" in out


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


def test_error_messages_stay_one_line(tmp_path, capsys):
    bad = tmp_path / "evil\nname\x1b[2J.safetensors"
    rc, out, err = cli(capsys, "diff", bad, bad)
    assert rc == 2 and ESC not in err
    assert one_error(err).endswith("evil\\nname\\x1b[2J.safetensors: no such file or directory")


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


def test_dash_m_means_manifest_in_snapshot_as_in_diff(files, tmp_path, capsys):
    st = tmp_path / "st"
    rc, _, err = cli(capsys, "snapshot", files["x"], "--store", st, "-m", files["man"])
    assert rc == 0, err
    rc, out, _ = cli(capsys, "show", f"{st}@latest", "--format", "json")
    shown = json.loads(out)
    assert shown["manifest"]["trainable"] == ["nothing"] and shown["message"] is None
