"""``ckptdiff diff OLD NEW``: compare two checkpoints, tensor by tensor, for people and for CI.

The command is a thin edge around :func:`ckptdiff.diff` and
:mod:`ckptdiff.render`: parse flags, attach a progress bar when a person is
watching, render, and turn the verdict into diff(1)'s exit codes.
"""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import CkptError, NothingSelected
from ..render import FORMATS
from ..report import FAIL_ON
from .output import is_special, check_output, write_output

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

DESCRIPTION = """\
Compare two checkpoints tensor by tensor and say, for each tensor, whether it
is identical (bitwise), changed (with max |delta|, mean |delta|, relative L2
change and the number of elements that differ), added, removed, or changed
shape or dtype.

OLD and NEW can be any supported file (safetensors, a sharded HF directory or
its index file, a torch.distributed.checkpoint directory, PyTorch
.pt/.pth/.bin, HDF5 .h5, NumPy .npy/.npz; the format is read from the
content, not the extension) or a snapshot in a store, DIR@REF.

With a manifest (--manifest FILE, or trainable_keys embedded in a checkpoint)
each tensor gets a role. A *frozen* tensor that changed, was removed or
changed shape/dtype is DRIFT; a *trainable* tensor that is bitwise identical
is STALE (trainable but never updated, e.g. left out of the optimizer).
Manifest file: {"trainable": ["head.*"], "frozen": ["backbone.*"]} (fnmatch
globs on full names; with only "trainable", everything else is frozen).

With --lora ADAPTER_DIR (a PEFT adapter: adapter_config.json and
adapter_model.safetensors or .bin), OLD is the base model and NEW the merged
one: each tensor the adapter targets must equal BASE + scaling * B @ A within
the rounding of its dtype (merge-exact, else merge-off by the largest error),
each modules_to_save tensor the adapter's copy, and every other tensor BASE,
bitwise (else changed-outside).
"""

EPILOG = """\
examples:
  ckptdiff diff base.safetensors tuned.safetensors
  ckptdiff diff base.pt tuned.pt --manifest manifest.json
  ckptdiff diff base.safetensors tuned.safetensors --manifest manifest.json \\
      --atol 1e-6 --format github            # CI: annotations on drifted tensors
  ckptdiff diff a.safetensors b.safetensors --format json --output diff.json
  ckptdiff diff a.h5 b.h5 --include 'encoder.*' --exclude '*.num_batches_tracked'
  ckptdiff diff runs/store@first runs/store@latest --format markdown >> "$GITHUB_STEP_SUMMARY"
  ckptdiff diff base.safetensors merged.safetensors --lora out/adapter   # verify a LoRA merge

tolerance:
  Equality is bitwise: one ulp, -0.0 vs +0.0 or a new NaN is a change and is
  always reported with its numbers. --atol/--rtol only decide whether a
  change of a frozen tensor counts as drift: it drifts when any element has
  |new - old| > atol + rtol * |old|, or became NaN/Inf.

exit codes (as diff(1)):
  0  passes the policy (--fail-on)
  1  fails the policy: a frozen tensor drifted (--fail-on drift, the default
     when a manifest is known) or any tensor differs (--fail-on change, the
     default without a manifest); with --lora, a target is merge-off or a
     tensor changed outside the adapter
  2  trouble: a missing, unreadable or corrupt file, a bad manifest, bad flags
"""


def tolerance(text: str) -> float:
    """argparse type for --atol/--rtol: a finite number >= 0 (shared by `diff` and `tui`)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v >= 0.0) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diff",
        help="compare two checkpoints tensor by tensor; flag frozen-layer drift",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("old", metavar="OLD", help="the reference checkpoint (file, sharded directory or DIR@REF)")
    p.add_argument("new", metavar="NEW", help="the checkpoint to check against OLD")
    p.add_argument("--manifest", "-m", metavar="FILE",
                   help="trainable-key manifest JSON (default: the one embedded in NEW, else in OLD, else none)")
    p.add_argument("--lora", metavar="ADAPTER_DIR",
                   help="verify that NEW is OLD with this PEFT LoRA adapter merged in, and nothing else changed")
    p.add_argument("--atol", type=tolerance, default=0.0, metavar="A",
                   help="absolute tolerance for drift (default 0: any change of a frozen tensor is drift)")
    p.add_argument("--rtol", type=tolerance, default=0.0, metavar="R",
                   help="relative tolerance for drift, times |old| (default 0)")
    p.add_argument("--include", action="append", metavar="GLOB", default=None,
                   help="only compare tensors whose name matches GLOB (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", default=None,
                   help="skip tensors whose name matches GLOB (repeatable)")
    p.add_argument("--format", "-f", choices=FORMATS, default="table",
                   help="output format (default: table); json follows the schema ckptdiff.diff/2 and, like the table, lists identical tensors only with --all")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write the report to FILE (replaced atomically) instead of stdout; - is stdout")
    p.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help="what makes the exit code 1 (default: drift with a manifest, else change)")
    p.add_argument("--all", "-a", action="store_true", dest="show_all",
                   help="list identical tensors too (table, markdown and json)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing on stdout; only the exit code (and --output) tell")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--rank", type=_rank, default=None, metavar="R",
                   help="also call a changed matrix 'low_rank' when its delta has numerical rank <= R "
                        "(randomized SVD; reads those tensors whole once more)")
    p.set_defaults(func=run)


def _rank(text: str) -> int:
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}") from None
    if not 1 <= r <= 4096:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 4096, not {text!r}")
    return r


def run(args: argparse.Namespace) -> int:
    from ..api import diff
    from ..progress import byte_bar

    inputs = (args.old, args.new) + ((args.manifest,) if args.manifest else ())
    check_output(args.output, inputs)  # fail before a long diff, not after it
    if args.lora:
        _check_lora_flags(args)
    try:
        with byte_bar("diffing", enabled=not args.no_progress) as progress:
            if args.lora:
                from ..lora import verify_merge
                report = verify_merge(args.old, args.new, args.lora, include=args.include, exclude=args.exclude,
                                      fail_on=args.fail_on, progress=progress)
            else:
                report = diff(
                    args.old, args.new,
                    manifest=args.manifest,
                    atol=args.atol, rtol=args.rtol,
                    include=args.include, exclude=args.exclude,
                    fail_on=args.fail_on,
                    progress=progress,
                    rank=args.rank,
                    # Only a JSON report with --all lists identical tensors (and their hashes): the
                    # others need no hash of the bytes that did not change.
                    hash_identical=args.format == "json" and args.show_all,
                )
    except NothingSelected as e:
        # The same error, in the words of the flags the user typed.
        flags = " ".join(f"--include {g!r}" for g in e.include)
        flags += "".join(f" --exclude {g!r}" for g in e.exclude)
        raise CkptError(e.describe(flags)) from None
    _emit(report, args)
    return report.exit_code


def _check_lora_flags(args: argparse.Namespace) -> None:
    """Flags that would change what a merge check means are refused, not silently ignored."""
    if args.manifest:
        raise CkptError("--manifest and --lora do not mix: --lora makes the manifest from the adapter")
    if args.atol or args.rtol:
        raise CkptError("--atol/--rtol do not apply with --lora: the merge tolerance comes from the dtype, "
                        "and every tensor outside the adapter must be bitwise identical")
    if args.fail_on == "change":
        raise CkptError("--fail-on change does not apply with --lora (every merged target changes); "
                        "use drift (the default) or never")


def _emit(report: Any, args: argparse.Namespace) -> None:
    from ..render import render

    if args.output and args.output != "-":
        write_output(args.output, lambda f: render(report, args.format, f, show_all=args.show_all, color=False))
        if not args.quiet and args.format != "json" and not is_special(args.output):
            print(f"report written to {args.output}", file=sys.stderr)
        return
    if args.quiet:
        return
    render(report, args.format, sys.stdout, show_all=args.show_all)
    sys.stdout.flush()
