"""The ``ckptdiff`` command line.

Each subcommand lives in ``ckptdiff/commands/<name>.py`` with
``register(subparsers)`` (adds its parser and sets ``func``), so this file only
wires them together and owns the error contract shared by all of them:

* exit 0: success / the policy passed; 1: differences that fail the policy;
  2: trouble (bad input, missing file, internal error);
* errors are one line on stderr, ``ckptdiff: error: PATH: what is wrong``,
  never a traceback (``--debug`` shows it).

Nothing here imports torch or textual; commands import what they need when
they run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import CkptError
from .textsafe import one_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("diff", "store_cmds", "tui_cmd", "report_cmd")
#: The module that registers each command. A command line that names its
#: command builds only that module's parsers: importing the other modules
#: and adding their ~60 arguments would be a tenth of a small diff's
#: start-up. (tests/cli check this table against what the modules register.)
COMMAND_MODULES = {
    "diff": "diff",
    **dict.fromkeys(("init", "snapshot", "log", "show", "export", "verify", "rm", "gc"), "store_cmds"),
    "tui": "tui_cmd",
    "report": "report_cmd",
}

EXIT_OK, EXIT_FAIL, EXIT_TROUBLE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    _checking_argument = False

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # argparse makes a help formatter for every argument added, only to check
        # its metavar; a formatter asks shutil for the terminal's width, and
        # importing shutil (zlib, bz2, lzma) costs a run that prints no help ~2 ms.
        # The check does not depend on the width, so it gets a fixed one.
        self._checking_argument = True
        try:
            return super().add_argument(*args, **kwargs)
        finally:
            self._checking_argument = False

    def _get_formatter(self) -> argparse.HelpFormatter:
        if self._checking_argument:
            return self.formatter_class(prog=self.prog, width=80)
        return super()._get_formatter()

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors follow the same one-line contract as every
        # other error (a CI log shows one line, not a usage block); the line says
        # where the full usage is.
        cmd = self.prog.split()[1:]  # "ckptdiff diff" -> ["diff"]
        where = f"{' '.join(cmd)}: " if cmd else ""
        see = f"ckptdiff {' '.join(cmd)} --help" if cmd else "ckptdiff --help"
        self.exit(EXIT_TROUBLE, f"ckptdiff: error: {one_line(where + message)} (see '{see}')\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ckptdiff`` parser; with ``command`` (a name in COMMAND_MODULES), only that command's module registers."""
    parser = _Parser(
        prog="ckptdiff",
        description=(
            "Tensor-by-tensor diffs of model checkpoints, frozen-layer drift detection,\n"
            "and a deduplicated snapshot history for fine-tuning runs."
        ),
        epilog=(
            "Exit codes follow diff(1): 0 = passes, 1 = differences that fail the policy,\n"
            "2 = trouble (bad input, missing file). Run 'ckptdiff COMMAND --help' for details.\n\n"
            "environment:\n"
            "  CKPTDIFF_DEBUG=1                 same as --debug\n"
            "  CKPTDIFF_HDF5_TIMEOUT=SECONDS    give up (exit 2) when the HDF5 library takes longer to open a\n"
            "                                   file and read its metadata (default 120; a corrupt file can\n"
            "                                   make it loop forever)\n"
            "  CKPTDIFF_OPEN_TIMEOUT=SECONDS    give up (exit 2) when opening any checkpoint (reading its header,\n"
            "                                   pickle or directory) takes longer (default 300)\n"
            "  CKPTDIFF_STATS=numpy             measure changed tensors with numpy, not the C module"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    # prog: what argparse would work out with a help formatter (the parser's usage up to
    # the command: no positionals come before it), without importing shutil for one.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, prog=parser.prog)
    for mod_name in (COMMAND_MODULES[command],) if command in COMMAND_MODULES else COMMANDS:
        importlib.import_module(f".commands.{mod_name}", __package__).register(sub)
    for cmd_parser in sub.choices.values():
        # `ckptdiff diff a b --debug` should work as well as `ckptdiff --debug diff a b`;
        # SUPPRESS keeps a subcommand from resetting a --debug given before it.
        cmd_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show the Python traceback on errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A one-shot diff makes almost no reference cycles, but the cyclic
    # collector still walks every object the imports create, several times
    # (~3% of a 1 GB diff's CPU, measured with perf; ~1 ms of start-up).
    # Off from here on for `diff`; other commands get it back after parsing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        parser = build_parser(_named_command(argv))
        args = parser.parse_args(argv)
    except BaseException as e:
        if collecting:
            gc.enable()
        if isinstance(e, SystemExit):  # --help, --version, or a usage error already printed as one line
            return e.code if isinstance(e.code, int) else EXIT_TROUBLE
        raise
    if collecting and args.command != "diff":
        gc.enable()
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_TROUBLE
    debug = args.debug or bool(os.environ.get("CKPTDIFF_DEBUG"))
    if "numpy" not in sys.modules:
        # ckptdiff's own threads keep every core busy; multithreaded BLAS on
        # top only spins (see stats_numpy._DOT_OK; numpy measures only where the
        # C module was not built). A user's explicit setting wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:  # freed blocks go back to the system instead of staying in the heap (see _ckernel.c)
        from . import _ckernel

        _ckernel.fix_mmap_threshold()
    except ImportError:  # pragma: no cover - installs without a compiler
        pass
    from . import watchdog

    try:
        with watchdog.enabled():  # a C library stuck on a corrupt file ends the run: one line, exit 2
            return int(args.func(args) or 0)
    except CkptError as e:
        if debug:
            raise
        _error(str(e))
        return EXIT_TROUBLE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        # `ckptdiff diff ... | head`: not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
    except MemoryError:
        _error("out of memory")
        return EXIT_TROUBLE
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
        return EXIT_TROUBLE
    except Exception as e:  # a bug: still one line, the traceback behind --debug
        if debug:
            raise
        _error(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        return EXIT_TROUBLE


#: Commands whose process may end without the interpreter's teardown (see :func:`entry`):
#: they only read files, so by the time they return there is nothing left to finish.
FAST_EXIT_COMMANDS = frozenset({"diff"})


def entry() -> None:
    """The ``ckptdiff`` console script and ``python -m ckptdiff``: :func:`main`, then the exit.

    A read-only command (``diff``) ends with ``os._exit`` once its output is
    flushed: the interpreter's teardown frees every object one by one (the
    names, rows and modules of a many-tensor diff), which was a tenth of a
    small diff's wall time and buys nothing when nothing is left to write.
    Every other command, and :func:`main` called from Python, exits normally.
    """
    argv = sys.argv[1:]
    code = main(argv)
    if _named_command(argv) not in FAST_EXIT_COMMANDS:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `ckptdiff diff ... | head`: as main's own handler, not an error
        pass
    except OSError:  # output that cannot be written (a full disk): the normal exit reports it
        sys.exit(code)
    os._exit(code)


def _named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if nothing before it but ``--debug`` (so no top-level
    ``--help``, which lists every command) and it is one of COMMAND_MODULES; else None."""
    for arg in argv:
        if arg != "--debug":
            return arg if arg in COMMAND_MODULES else None
    return None


def _error(msg: str) -> None:
    # A message may quote a hostile tensor name, path or ref: keep it to one visible line of bounded length.
    print(f"ckptdiff: error: {one_line(msg)}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    entry()
