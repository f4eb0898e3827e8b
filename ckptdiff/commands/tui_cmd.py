"""``ckptdiff tui STORE`` / ``ckptdiff tui OLD NEW``: the interactive browser.

Textual is an optional extra, imported only inside :func:`run`, so the rest
of the CLI starts fast and works without it. The inputs are checked here,
before the terminal switches to full-screen, so a wrong path is the CLI's
usual one-line error and exit 2, not a crash inside the app.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .diff import tolerance

DESCRIPTION = """\
Browse a snapshot store's history, or one diff, in the terminal.

  ckptdiff tui STORE       history mode: the snapshots of a store (step, time,
                           tag, loss, tensors changed, drift); the selected
                           snapshot's tensors are diffed against a base (the
                           first snapshot; b switches to the previous one or
                           to a snapshot marked with m).
  ckptdiff tui OLD NEW     two-checkpoint mode: the tensor table of one diff.
                           OLD and NEW are any supported files or DIR@REF.

In the tensor table, frozen tensors that changed (drift) are red and on top;
trainable tensors that never changed (stale) are yellow. Enter on a tensor
shows its max |delta| across the whole history and the first snapshot where
it drifted. Press ? inside for every key; Ctrl+P opens the command palette.
"""

EPILOG = """\
keys:
  up/down j/k move   Tab switch list/table   Enter tensor detail   b base
  m mark   d drift only   / filter   r role   c status   s sort   ? help   q quit

filter (/):  attn   *.weight   re:^enc\\.\\d   role:frozen   status:changed   is:drift

examples:
  ckptdiff tui runs/store
  ckptdiff tui runs/store@first runs/store@latest
  ckptdiff tui base.safetensors tuned.safetensors --manifest manifest.json

exit codes:
  0  you quit the app (q)
  2  trouble before it starts: no such store or file, a bad manifest or ref,
     bad flags, Textual not installed (one line on stderr). Problems found
     while it runs are shown on its status line instead.

Needs Textual, the 'tui' extra: pip install '.[tui]' in a ckptdiff checkout,
or pip install 'textual>=0.80' beside an installed ckptdiff.
"""

INSTALL_HINT = ("the TUI needs Textual, which is not installed: pip install 'textual>=0.80' "
                "(or, in a ckptdiff checkout, pip install '.[tui]')")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tui",
        help="browse a store's history or one diff interactively (drifted frozen layers in red)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("first", metavar="STORE|OLD",
                   help="a store directory (history mode), or the old checkpoint (file or DIR@REF)")
    p.add_argument("second", nargs="?", metavar="NEW",
                   help="the new checkpoint: with it, two-checkpoint mode")
    p.add_argument("--manifest", metavar="FILE",
                   help="trainable-key manifest JSON for two-checkpoint mode (a store records its own)")
    p.add_argument("--atol", type=tolerance, default=0.0, metavar="X",
                   help="absolute tolerance before a frozen tensor's change counts as drift (default 0)")
    p.add_argument("--rtol", type=tolerance, default=0.0, metavar="X",
                   help="relative tolerance, as in ckptdiff diff (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CkptError
    from ..resolve import check_store

    paths: list[str] = [args.first] + ([args.second] if args.second is not None else [])
    if len(paths) == 1:
        check_store(paths[0])
        if args.manifest:
            raise CkptError("--manifest is for two-checkpoint mode; a store records its own manifests")
    else:
        _check_checkpoints(paths[0], paths[1], args.manifest)

    try:
        from ckptdiff.tui.app import CkptdiffApp
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] == "textual":
            print(f"ckptdiff: error: {INSTALL_HINT}", file=sys.stderr)
            return 2
        raise
    if len(paths) == 1:
        app = CkptdiffApp(store=paths[0], atol=args.atol, rtol=args.rtol)
    else:
        app = CkptdiffApp(old=paths[0], new=paths[1], manifest=args.manifest, atol=args.atol, rtol=args.rtol)
    app.run()
    return 0




def _check_checkpoints(old: str, new: str, manifest: str | None) -> None:
    from ..manifest import Manifest
    from ..resolve import open_checkpoint

    for p in (old, new):
        open_checkpoint(p).close()
    if manifest:
        Manifest.load(manifest)
