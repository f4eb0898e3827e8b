"""``ckptdiff report``: a history (or one diff) as one self-contained HTML file.

What a person wants from 50 snapshots × 300 layers is a picture: which
layers moved, when, and whether any of them should not have. The page has

* the verdict (baseline vs the last snapshot) and, for each drifted frozen
  tensor, its cause in words;
* a layer × snapshot heatmap of the relative change against the baseline
  (``||new − old|| / ||old||`` on a log colour scale), drifted frozen cells
  outlined in red;
* the metrics recorded with the snapshots, as small line charts;
* the per-tensor table of the last diff, with causes and their evidence.

Everything is inline (HTML, CSS, SVG; no script, no font, no URL), so the
file opens offline, from a CI artifact or an e-mail. To stay small at
15,000 cells the heatmap is one SVG path per colour, cells in cell units
and horizontal runs of one colour merged: about 16 bytes a cell at worst.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from . import __version__
from .cause import evidence, words
from .render import cause_groups, fmt_num, ordered, summary_line, verdict_line
from .timeline import Timeline

#: Colour steps of the heatmap: rel change below 1e-6, [1e-6, 1e-5), ..., [1e-1, 1), >= 1.
EDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PALETTE = ("#fde725", "#b5de2b", "#6ece58", "#35b779", "#1f9e89", "#26828e", "#31688e", "#3e4989")
OTHER_COLOUR = "#888888"      # changed without a rel L2: reshaped, retyped, added, NaN
IDENTICAL_COLOUR = "#f2f2f2"
#: Cell size in pixels: wide when there are few snapshots, down to MIN_CELL_W for many.
MIN_CELL_W, MAX_CELL_W, HEATMAP_WIDTH, CELL_H = 10, 40, 720, 13
#: The table lists at most this many tensors (the rest are in ``ckptdiff diff --format json``).
MAX_TABLE_ROWS = 2000

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.sub{color:#666;margin-bottom:12px}.verdict{font-weight:600;font-size:16px;padding:8px 12px;border-radius:6px}
.fail{background:#fde8e8;color:#9b1c1c}.pass{background:#e6f4ea;color:#1e6b34}.warn{background:#fff4d6;color:#7a5300}
ul.why{margin:8px 0 0 0;padding-left:20px;color:#9b1c1c}
.scroll{overflow:auto;max-height:80vh;border:1px solid #ddd;border-radius:6px;padding:6px}
svg text{font:10px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;fill:#333}
svg text.frozen{font-weight:600}svg text.drift{fill:#c00;font-weight:600}
.legend span{display:inline-block;width:18px;height:12px;vertical-align:middle;margin:0 2px 0 10px;border:1px solid #ccc}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart{border:1px solid #ddd;border-radius:6px;padding:6px}
table{border-collapse:collapse;font-size:12px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{position:sticky;top:0;background:#fafafa}td{white-space:nowrap}td.ev{white-space:normal}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.drift td{color:#9b1c1c}tr.stale td{color:#7a5300}code{font-size:12px}
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def bucket(rel: float | None) -> int | None:
    """The colour index of a relative change (None: no number to colour by)."""
    if rel is None or math.isnan(rel):
        return None
    for i, edge in enumerate(EDGES):
        if rel < edge:
            return i
    return len(EDGES)


def _heatmap(tl: Timeline) -> str:
    names = tl.names
    cols = [tl.cell(j) for j in range(len(tl.columns))]
    cell_w = max(MIN_CELL_W, min(MAX_CELL_W, HEATMAP_WIDTH // max(1, len(cols))))
    label_chars = min(64, max((len(n) for n in names), default=8))
    left = int(label_chars * 6.2) + 10
    top = max(30, 6 * max((len(c.label.split(" ")[0]) for c in tl.columns), default=3) + 8)
    width = left + cell_w * len(cols) + 10
    height = top + CELL_H * len(names) + 10
    paths: dict[str, list[str]] = {}
    drift: list[str] = []
    frozen_rows: set[int] = set()
    drift_rows: set[int] = set()
    for i, name in enumerate(names):
        run_colour: str | None = None
        run_start = 0
        row: list[str | None] = []
        for j, cells in enumerate(cols):
            t = cells.get(name)
            colour: str | None
            if t is None:
                colour = "#ffffff"
            elif t.status == "identical":
                colour = None  # the background
            elif t.status == "changed" and t.rel_l2 is not None and not (t.nan_new or t.inf_new):
                b = bucket(t.rel_l2)
                colour = PALETTE[b] if b is not None else OTHER_COLOUR
            else:
                colour = OTHER_COLOUR
            row.append(colour)
            if t is not None and t.drift:
                drift.append(f"M{j} {i}h1v1h-1z")
                drift_rows.add(i)
            if t is not None and t.role == "frozen":
                frozen_rows.add(i)
        row.append(None)  # flush the last run
        for j, colour in enumerate(row):
            if colour != run_colour:
                if run_colour is not None:
                    paths.setdefault(run_colour, []).append(f"M{run_start} {i}h{j - run_start}v1h{run_start - j}z")
                run_colour, run_start = colour, j
    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="relative change of each tensor against the baseline, snapshot by snapshot">']
    for j, c in enumerate(tl.columns):
        x = left + cell_w * j + cell_w / 2
        out.append(f'<text transform="translate({x:.0f},{top - 4}) rotate(-60)"><title>{_e(c.label)}</title>'
                   f'{_e(c.label.split(" ")[0] if len(tl.columns) > 1 else "NEW")}</text>')
    for i, name in enumerate(names):
        shown = name if len(name) <= label_chars else "…" + name[-(label_chars - 1):]
        cls = ' class="drift"' if i in drift_rows else ' class="frozen"' if i in frozen_rows else ""
        out.append(f'<text x="{left - 6}" y="{top + CELL_H * i + CELL_H - 2}" text-anchor="end"{cls}>'
                   f'<title>{_e(name)}</title>{_e(shown)}</text>')
    out.append(f'<g transform="translate({left},{top}) scale({cell_w},{CELL_H})">')
    out.append(f'<rect width="{len(cols)}" height="{len(names)}" fill="{IDENTICAL_COLOUR}"/>')
    for colour, segs in paths.items():
        out.append(f'<path fill="{colour}" d="{"".join(segs)}"/>')
    if drift:
        out.append(f'<path fill="none" stroke="#d00" stroke-width="2" vector-effect="non-scaling-stroke" '
                   f'd="{"".join(drift)}"/>')
    out.append("</g></svg>")
    return "".join(out)


def _legend() -> str:
    parts = [f'<span style="background:{IDENTICAL_COLOUR}"></span>identical']
    lo = "0"
    for colour, edge in zip(PALETTE, EDGES + (math.inf,)):
        hi = "∞" if edge == math.inf else "1" if edge == 1 else f"1e{round(math.log10(edge))}"
        parts.append(f'<span style="background:{colour}"></span>{lo}–{hi}')
        lo = hi
    parts.append(f'<span style="background:{OTHER_COLOUR}"></span>reshaped / retyped / NaN')
    parts.append('<span style="background:#fff;border:2px solid #d00"></span>frozen tensor drifted (name in red; '
                 'frozen names in bold)')
    return '<div class="legend">rel L2 vs baseline: ' + "".join(parts) + "</div>"


def _chart(name: str, xs: Sequence[float], ys: Sequence[float]) -> str:
    """A small line chart of one metric against the step (or the snapshot index)."""
    w, h, pad, left = 340, 130, 30, 52  # left: room for the y labels
    lo, hi = min(ys), max(ys)
    x0, x1 = min(xs), max(xs)
    yspan, xspan = (hi - lo) or 1.0, (x1 - x0) or 1.0
    pts = " ".join(f"{left + (w - left - pad) * (x - x0) / xspan:.1f},{h - pad - (h - 2 * pad) * (y - lo) / yspan:.1f}"
                   for x, y in zip(xs, ys))
    return (f'<div class="chart"><svg width="{w}" height="{h}" role="img" aria-label="{_e(name)}">'
            f'<text x="{left}" y="14" style="font-weight:600">{_e(name)}</text>'
            f'<line x1="{left}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#ccc"/>'
            f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{h - pad}" stroke="#ccc"/>'
            f'<polyline fill="none" stroke="#31688e" stroke-width="2" points="{pts}"/>'
            f'<text x="{left - 4}" y="{pad + 4}" text-anchor="end">{_e(fmt_num(hi))}</text>'
            f'<text x="{left - 4}" y="{h - pad}" text-anchor="end">{_e(fmt_num(lo))}</text>'
            f'<text x="{left}" y="{h - 12}">{_e(fmt_num(x0))}</text>'
            f'<text x="{w - pad}" y="{h - 12}" text-anchor="end">{_e(fmt_num(x1))}</text></svg></div>')


def _metrics(tl: Timeline) -> str:
    keys: list[str] = []
    for c in tl.columns:
        keys += [k for k in c.metrics if k not in keys]
    charts = []
    for k in keys:
        pts = [(c.step if c.step is not None else j, float(c.metrics[k])) for j, c in enumerate(tl.columns)
               if isinstance(c.metrics.get(k), (int, float)) and not isinstance(c.metrics.get(k), bool)
               and math.isfinite(float(c.metrics[k]))]
        if len(pts) >= 2:
            charts.append(_chart(k, [p[0] for p in pts], [p[1] for p in pts]))
    if not charts:
        return ""
    return '<h2>Metrics</h2><div class="charts">' + "".join(charts) + "</div>"


def _table(tl: Timeline) -> str:
    rows = ordered(tl.final, show_all=False)
    head = ("", "tensor", "status", "role", "dtype", "shape", "rel L2", "max |Δ|", "cause", "evidence")
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for t in rows[:MAX_TABLE_ROWS]:
        cls = "drift" if t.drift else "stale" if t.stale else ""
        flag = "DRIFT" if t.drift else "STALE" if t.stale else ""
        shape = t.shape_new if t.shape_new is not None else t.shape_old
        out.append(f'<tr class="{cls}"><td>{flag}</td><td><code>{_e(t.name)}</code></td><td>{_e(t.status)}</td>'
                   f"<td>{_e(t.role)}</td><td>{_e(t.dtype_new or t.dtype_old or '-')}</td>"
                   f"<td>{_e(tuple(shape) if shape is not None else '-')}</td>"
                   f'<td class="n">{_e(fmt_num(t.rel_l2))}</td><td class="n">{_e(fmt_num(t.max_abs_delta))}</td>'
                   f"<td>{_e(words(t.cause, t.cause_detail))}</td>"
                   f'<td class="ev">{_e(evidence(t.cause_detail))}</td></tr>')
    out.append("</tbody></table>")
    if len(rows) > MAX_TABLE_ROWS:
        out.append(f"<p>…and {len(rows) - MAX_TABLE_ROWS} more (see <code>ckptdiff diff --format json</code>).</p>")
    if not rows:
        out = ["<p>Every tensor is bitwise identical to the baseline.</p>"]
    return "".join(out)


def render_html(tl: Timeline) -> str:
    """The whole page."""
    final = tl.final
    failed, _ = final.verdict()
    cls = "fail" if failed else "warn" if final.stale else "pass"
    why = cause_groups(final)
    last = tl.columns[-1].label
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>ckptdiff report: {_e(tl.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>ckptdiff report: <code>{_e(tl.title)}</code></h1>",
        f'<div class="sub">baseline {_e(tl.baseline)} · {len(tl.columns)} '
        f'{"snapshot" if len(tl.columns) == 1 else "snapshots"} · {len(tl.names)} tensors · '
        f"ckptdiff {_e(__version__)}</div>",
        f'<div class="verdict {cls}">{_e(verdict_line(final))} <span style="font-weight:400">'
        f"(baseline vs {_e(last)})</span>",
    ]
    if why:
        parts.append('<ul class="why">' + "".join(f"<li>{_e(w)}</li>" for w in why[:MAX_TABLE_ROWS]) + "</ul>")
    parts.append(f'</div><div class="sub">{_e(summary_line(final))}</div>')
    parts.append("<h2>Relative change against the baseline</h2>")
    parts.append(_legend())
    parts.append(f'<div class="scroll">{_heatmap(tl)}</div>')
    parts.append(_metrics(tl))
    parts.append(f"<h2>Tensors: baseline vs {_e(last)}</h2>")
    parts.append(_table(tl))
    parts.append("</body></html>\n")
    return "".join(parts)


__all__ = ["render_html", "bucket", "EDGES", "PALETTE"]
