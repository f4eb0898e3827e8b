"""``ckptdiff report STORE | OLD NEW -o report.html``: one self-contained HTML page.

The page (see :mod:`ckptdiff.html_report`) is a CI artifact a person can
open offline: verdict and causes, a layer × snapshot heatmap of the change
against the baseline, metrics, and the tensor table. The exit code follows
``diff``: 1 when the last snapshot fails the policy, so a CI step can both
publish the page and fail.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .diff import _rank, tolerance
from .output import check_output, is_special, write_output

DESCRIPTION = """\
Write one self-contained HTML file (inline SVG and CSS: no script, no network)
about a store's history or one diff:

  ckptdiff report STORE -o report.html      every snapshot against the first
  ckptdiff report OLD NEW -o report.html    one diff (a one-column heatmap)

The page shows the verdict with the cause of each drifted frozen tensor, a
layer x snapshot heatmap of the relative change (rel L2) against the baseline
with drifted frozen cells outlined in red, the metrics recorded with the
snapshots, and the tensor table (baseline vs the last snapshot) with causes.
"""

EPILOG = """\
examples:
  ckptdiff report runs/store -o report.html
  ckptdiff report base.safetensors tuned.safetensors -m manifest.json -o report.html

exit codes (as diff(1)):
  0  the last snapshot passes the policy   1  it fails (drift)   2  trouble
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="write a self-contained HTML report of a store's history or a diff",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", metavar="STORE|OLD", help="a store directory, or the old checkpoint")
    p.add_argument("second", nargs="?", metavar="NEW", help="the new checkpoint (then OLD is a checkpoint too)")
    p.add_argument("--output", "-o", metavar="FILE", required=True,
                   help="the HTML file to write (replaced atomically); - writes to stdout")
    p.add_argument("--manifest", "-m", metavar="FILE",
                   help="trainable-key manifest JSON (default: the one recorded in the store or checkpoint)")
    p.add_argument("--atol", type=tolerance, default=0.0, metavar="A", help="as in ckptdiff diff")
    p.add_argument("--rtol", type=tolerance, default=0.0, metavar="R", help="as in ckptdiff diff")
    p.add_argument("--rank", type=_rank, default=None, metavar="R", help="as in ckptdiff diff (low_rank causes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..html_report import render_html
    from ..timeline import from_pair, from_store

    inputs = tuple(x for x in (args.first, args.second, args.manifest) if x)
    check_output(args.output, inputs)
    opts = {"manifest": args.manifest, "atol": args.atol, "rtol": args.rtol, "rank": args.rank}
    if args.second is None:
        from ..resolve import check_store

        check_store(args.first)
        tl = from_store(args.first, **opts)
    else:
        tl = from_pair(args.first, args.second, **opts)
    page = render_html(tl)
    if args.output == "-":
        sys.stdout.write(page)
    else:
        write_output(args.output, lambda f: f.write(page))
        if not is_special(args.output):
            print(f"report written to {args.output} ({len(page.encode()) // 1024} KiB)", file=sys.stderr)
    return tl.final.exit_code
