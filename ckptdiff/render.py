"""Renderers: a :class:`~ckptdiff.report.DiffReport` as a table, JSON, Markdown or GitHub annotations.

Renderers only read the report; they never touch files other than the
stream they are given, and only the table imports rich (lazily), so the
JSON path of the CLI stays as cheap as possible.

Every renderer sorts the same way (drift first, then stale, then other
differences in status order, then identical tensors, each group in
checkpoint order) and says the same one-line verdict, so a reader who knows
one format knows them all.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from itertools import islice

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import IO, Any

from .display import dtype_of as fmt_dtype
from .display import num as fmt_num
from .display import shape as _shape
from .display import shape_of as fmt_shape
from .cause import explain, words
from .report import ROW_FIELDS, STATUSES, DiffReport, Rows, TensorDiff, _json_float, merge_off_text, row_values, rows_to_list
from .textsafe import printable

try:  # optional C writer of the JSON rows (see _rows)
    from . import _crows
except ImportError:  # pragma: no cover - installs without a compiler
    _crows = None  # type: ignore[assignment]

FORMATS = ("table", "json", "markdown", "github")
#: Markdown for PR comments stays under GitHub's 65,536-character comment limit.
MARKDOWN_MAX_ROWS = 200

_STATUS_LABEL = {
    "identical": "identical",
    "changed": "changed",
    "added": "added",
    "removed": "removed",
    "shape_changed": "shape changed",
    "dtype_changed": "dtype changed",
}


# ---------------------------------------------------------------------------
# shared wording
# ---------------------------------------------------------------------------

def sort_key(t: TensorDiff) -> int:
    if t.drift or _merge_failed(t):
        return 0
    if t.stale:
        return 1
    if t.status != "identical":
        return 2 + STATUSES.index(t.status)
    return 2 + len(STATUSES)


def ordered(report: DiffReport, show_all: bool = False) -> list[TensorDiff]:
    """Rows worth showing, most important first (stable within a group).

    Identical tensors are hidden unless ``show_all``; a stale tensor is
    identical too, but it is a warning, so it is always shown.
    """
    return sorted(rows_to_list(report.tensors, show_all), key=sort_key)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _differ(n: int) -> str:
    return f"{_plural(n, 'tensor')} {'differs' if n == 1 else 'differ'}"


def _merge_failed(t: TensorDiff) -> bool:
    return t.merge is not None and t.merge.verdict in ("merge-off", "changed-outside")


def _merge_verdict_line(report: DiffReport) -> str:
    """PASS/FAIL of a LoRA merge check (``--lora``)."""
    m = report.merge_summary()
    if report.failed:
        parts = [_plural(m["merge-off"], "target") + " merge-off" if m["merge-off"] else "",
                 (_plural(m["changed-outside"], "tensor") + " changed outside the adapter") if m["changed-outside"]
                 else ""]
        return "FAIL: " + ", ".join(p for p in parts if p)
    base = (f"PASS: merge verified: {_plural(m['merge-exact'], 'target')} merge-exact, "
            f"{_plural(m['identical'], 'other tensor')} bitwise identical")
    if report.fail_on == "never" and (m["merge-off"] or m["changed-outside"]):
        base = (f"PASS (--fail-on never): {m['merge-off']} merge-off, {m['changed-outside']} changed outside "
                "the adapter")
    return base


def fmt_merge(t: TensorDiff) -> str:
    """The merge verdict of one tensor, short, for table cells."""
    m = t.merge
    if m is None or m.verdict == "identical":
        return ""
    if m.verdict == "merge-exact":
        return "exact"
    if m.verdict == "changed-outside":
        return "changed outside"
    return "off" if m.max_error is None else f"off by {fmt_num(m.max_error)}"


def verdict_line(report: DiffReport) -> str:
    """One line: PASS/FAIL and why, under the report's ``fail_on`` policy."""
    if report.lora is not None:
        return _merge_verdict_line(report)
    s = report.summary()
    differ = s["total"] - s["identical"]
    if report.failed:
        if report.fail_on == "drift":
            return f"FAIL: {_plural(s['drifted'], 'frozen tensor')} drifted"
        return f"FAIL: {_differ(differ)} (--fail-on change)"
    if s["total"] == 0:
        # Two empty checkpoints, or --include/--exclude left nothing: say so
        # rather than claim that "all tensors" are identical.
        base = "PASS: no tensors to compare"
    elif report.fail_on == "drift":
        base = "PASS: no frozen tensor drifted"
    elif report.fail_on == "change":
        base = "PASS: all tensors are bitwise identical"
    else:
        base = f"PASS (--fail-on never): {_differ(differ)}, {s['drifted']} drifted"
    if s["stale"] and s["identical"] == s["total"]:
        # The same content on both sides (a snapshot against the file it was taken from):
        # nothing trained between them by design, so "never changed" would be a false alarm.
        base += "; the two sides are bitwise identical, so no trainable tensor changed either"
    elif s["stale"]:
        base += f"; warning: {_plural(s['stale'], 'trainable tensor')} never changed"
    return base


def cause_lines(report: DiffReport) -> list[str]:
    """One line per drifted frozen tensor that changed, saying why in words (after the verdict)."""
    return [f"{t.name} drifted: {explain(t.cause, t.cause_detail)}" for t in report.drifted if t.cause]


def cause_groups(report: DiffReport, names: int = 4) -> list[str]:
    """:func:`cause_lines` with the tensors that share a cause (in words) on one line, up to
    ``names`` of them by name: 300 decayed layers are one line in a PR comment, not 300."""
    groups: dict[str, list[str]] = {}
    for t in report.drifted:
        if t.cause:
            groups.setdefault(explain(t.cause, t.cause_detail), []).append(t.name)
    out = []
    for text, group in groups.items():
        more = f" and {len(group) - names} more" if len(group) > names else ""
        out.append(f"{', '.join(group[:names])}{more} drifted: {text}")
    return out


def summary_line(report: DiffReport) -> str:
    s = report.summary()
    parts = [f"{s[k]} {_STATUS_LABEL[k]}" for k in STATUSES if s[k]]
    line = f"{_plural(s['total'], 'tensor')}: {', '.join(parts) if parts else 'none compared'}"
    if report.manifest_source is not None:
        line += f"; {s['drifted']} drifted, {s['stale']} stale (manifest: {printable(report.manifest_source)})"
    else:
        line += "; no manifest (roles unknown, drift not checked)"
    if report.lora is not None:
        m = report.merge_summary()
        line += (f"; merge: {m['merge-exact']} exact, {m['merge-off']} off, "
                 f"{m['changed-outside']} changed outside the adapter")
    return line


def fmt_changed(t: TensorDiff) -> str:
    if t.changed_elements is None:
        return "-"
    n = t.numel or 0
    pct = 100.0 * t.changed_elements / n if n else 0.0
    out = f"{t.changed_elements:,}/{n:,} ({pct:.3g}%)"
    extra = []
    if t.nan_new:
        extra.append(f"+{t.nan_new:,} NaN")
    if t.inf_new:
        extra.append(f"+{t.inf_new:,} Inf")
    return out + (" " + ", ".join(extra) if extra else "")


def flag(t: TensorDiff) -> str:
    if t.merge is not None and t.merge.verdict == "merge-off":
        return "MERGE-OFF"
    if t.drift or (t.merge is not None and t.merge.verdict == "changed-outside"):
        return "DRIFT"
    if t.stale:
        return "STALE"
    if t.role == "frozen" and t.status == "changed":
        return "<=tol"  # a frozen tensor moved, but within --atol/--rtol: shown, not failed
    return ""


def describe(t: TensorDiff) -> str:
    """A sentence about one tensor, for annotations."""
    if t.merge is not None and t.merge.verdict == "merge-off":
        return merge_off_text(t.merge)
    if t.status == "changed":
        s = (f"changed: max |delta| {fmt_num(t.max_abs_delta)}, rel L2 {fmt_num(t.rel_l2)}, "
             f"{t.changed_elements:,} of {t.numel:,} elements differ")
        if t.nan_new or t.inf_new:
            s += f" ({t.nan_new} new NaN, {t.inf_new} new Inf)"
        if t.cause:
            s += f"; cause: {explain(t.cause, t.cause_detail) if t.drift else words(t.cause, t.cause_detail)}"
        return s
    if t.status == "shape_changed":
        return f"shape changed {_shape(t.shape_old)} -> {_shape(t.shape_new)}"
    if t.status == "dtype_changed":
        return f"dtype changed {t.dtype_old} -> {t.dtype_new}"
    if t.status == "identical":
        return "bitwise identical"
    return t.status


# ---------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------

def render_json(report: DiffReport, show_all: bool = True) -> str:
    """``report.to_json(identical=show_all)`` plus a newline, byte for byte, through the fast writer below."""
    buf = io.StringIO()
    write_json(report, buf, show_all)
    return buf.getvalue()


#: Tensor rows encoded per write: the output streams in pieces of about this
#: many rows, so a 200,000-tensor report never sits in memory as one string.
_JSON_BATCH = 4096


def write_json(report: DiffReport, file: IO[str], show_all: bool = True) -> None:
    """Write ``report.to_json(identical=show_all)`` plus a newline to ``file``, byte for byte, streaming
    the tensor rows (``ckptdiff diff --format json`` lists identical ones only with ``--all``).

    The report's top level is small; its ``tensors`` list is what grows with
    the checkpoint. Rows are made one at a time (``TensorDiff.to_dict``, so
    every field the schema has, now or later, is written), encoded by the
    row writer below in batches, and written as they are made: memory is one
    batch of rows, not the whole document. Anything the fast writers cannot
    promise to encode as ``json.dumps`` does falls back to it.
    """
    show_all = show_all or report.lora is not None
    head = report.to_dict(tensors=False, identical=show_all, reasons=False)
    # The verdict's reasons (one per changed tensor under --fail-on change) are
    # streamed too: a marker stands in the list, replaced as they are worded.
    head["verdict"]["reasons"] = [_REASONS_MARK] if head["verdict"]["failed"] else []
    rows: Sequence[TensorDiff] = report.tensors if show_all else list(rows_to_list(report.tensors, False))
    # Listing every row of a Rows builds the identical ones one batch at a time, without keeping them.
    take = rows.peek if isinstance(rows, Rows) else rows.__getitem__
    # json.dumps(indent=2) puts "tensors" where to_dict() does: write the
    # members before it, the rows, then the members after it.
    keys = list(head)
    at = keys.index("tensors")
    before = dumps_indent2({k: head[k] for k in keys[:at]})
    after = dumps_indent2({k: head[k] for k in keys[at + 1:]})
    if before is None or after is None:
        file.write(json.dumps(report.to_dict(identical=show_all), indent=2, allow_nan=False) + "\n")
        return
    file.write(before[:-2] + ',\n  "tensors": ' + ("[" if rows else "[]"))
    for i in range(0, len(rows), _JSON_BATCH):
        batch = [take(k) for k in range(i, min(i + _JSON_BATCH, len(rows)))]
        try:
            text = _rows(batch, first=i == 0)
        except _Unsupported:  # not from the engine; json.dumps decides, row by row, at the same depth
            text = "".join(("" if i == 0 and k == 0 else ",") + _ROW_NL
                           + json.dumps(t.to_dict(), indent=2, allow_nan=False).replace("\n", _ROW_NL)
                           for k, t in enumerate(batch))
        file.write(text)
    file.write(("\n  ]" if rows else "") + ",")
    lead, mark, tail = after[1:].partition(_esc(_REASONS_MARK))
    file.write(lead)
    if mark:
        reasons = report.reasons()
        sep = ",\n" + lead[lead.rindex("\n") + 1:]  # the list's indent
        for i, batch in enumerate(iter(lambda: list(islice(reasons, _JSON_BATCH)), [])):
            file.write(("" if i == 0 else sep) + sep.join(map(_esc, batch)))
    file.write(tail + "\n")


#: Stands for the verdict's reasons in the document's last members until they are written.
_REASONS_MARK = "\0reasons\0"


# The standard library indents only in its pure-Python encoder (CPython 3.11
# has no C path for ``indent``): one generator step per token, 25 ms of a
# 2,000-tensor diff. This writer emits the same bytes as
# ``json.dumps(obj, indent=2, allow_nan=False)`` ~2.5x faster: key prefixes
# are built once per key set, and every string and number goes through the
# functions ``json`` itself uses (``encode_basestring_ascii``,
# ``int.__repr__``, ``float.__repr__``). Anything else (another type, a
# non-str key, a non-finite float that ``json`` must refuse) makes it return
# None and the caller falls back to ``json.dumps``, so output never differs.

_esc = json.encoder.encode_basestring_ascii
_INF = float("inf")


class _Unsupported(Exception):
    pass


def _float(x: float) -> str:
    if x != x or x == _INF or x == -_INF:
        raise _Unsupported
    return float.__repr__(x)


_SCALAR = {
    str: _esc,
    int: int.__repr__,
    float: _float,
    bool: lambda b: "true" if b else "false",
    type(None): lambda _: "null",
}


def dumps_indent2(obj: Any) -> str | None:
    """``json.dumps(obj, indent=2, allow_nan=False)``, or None when it cannot promise the same bytes."""
    out: list[str] = []
    try:
        _value(obj, out, "\n")
    except (_Unsupported, RecursionError):  # deep or circular: json says what it says
        return None
    return "".join(out)


def _value(v: Any, out: list[str], nl: str) -> None:
    enc = _SCALAR.get(type(v))
    if enc is not None:
        out.append(enc(v))
    elif type(v) is dict:
        _dict(v, out, nl)
    elif type(v) is list or type(v) is tuple:
        _list(v, out, nl)
    else:
        raise _Unsupported


_PREFIXES: dict[tuple[tuple[str, ...], str], list[str]] = {}


def _dict(d: dict[Any, Any], out: list[str], nl: str) -> None:
    if not d:
        out.append("{}")
        return
    inner = nl + "  "
    keys = tuple(d)
    pre = _PREFIXES.get((keys, nl))
    if pre is None:
        if not all(type(k) is str for k in keys):
            raise _Unsupported  # json's key coercion rules: leave them to json
        pre = ["{" + inner + _esc(keys[0]) + ": "] + ["," + inner + _esc(k) + ": " for k in keys[1:]]
        if len(_PREFIXES) < 64:  # a report repeats a handful of key sets thousands of times
            _PREFIXES[(keys, nl)] = pre
    scalar = _SCALAR
    for p, v in zip(pre, d.values()):
        enc = scalar.get(type(v))
        if enc is not None:
            out.append(p + enc(v))
        else:
            out.append(p)
            _value(v, out, inner)
    out.append(nl + "}")


def _list(items: list[Any] | tuple[Any, ...], out: list[str], nl: str) -> None:
    if not items:
        out.append("[]")
        return
    inner = nl + "  "
    if all(type(v) is int for v in items):  # shapes: the only lists in a report, one join
        out.append(f"[{inner}{(',' + inner).join(map(int.__repr__, items))}{nl}]")
        return
    sep = "[" + inner
    scalar = _SCALAR
    for v in items:
        enc = scalar.get(type(v))
        if enc is not None:
            out.append(sep + enc(v))
        else:
            out.append(sep)
            _value(v, out, inner)
        sep = "," + inner
    out.append(nl + "]")


#: A row's members sit at this depth of the document, its shapes' elements one deeper.
_ROW_NL, _ROW_IN, _ROW_IN2 = "\n    ", "\n      ", "\n        "


def _int_list(v: list[Any]) -> str:
    if not v:
        return "[]"
    for x in v:
        if type(x) is not int:
            raise _Unsupported
    return "[" + _ROW_IN2 + ("," + _ROW_IN2).join(map(int.__repr__, v)) + _ROW_IN + "]"


def _nested(v: Any) -> str:
    out: list[str] = []
    _value(v, out, _ROW_IN)
    return "".join(out)


#: Encoders of a row's member values, by type: scalars as ``json`` writes
#: them, shapes in one join, anything else (a merge check) through _value.
_ROW_VALUE = {**_SCALAR, list: _int_list, dict: _nested, tuple: _nested}


def _rows(rows: list[TensorDiff], first: bool) -> str:
    """Tensor rows as they appear inside the report's ``"tensors"`` list, each led by its separator."""
    if _crows is not None and _FAST_ROWS and all(type(t) is TensorDiff for t in rows):
        # The same bytes as _fast_row, row for row; None (a merge check, a value of another type) leaves
        # the whole batch to the loop below.
        text = _crows.encode_rows(list(map(row_values, rows)), first)
        if text is not None:
            return text
    out: list[str] = []
    enc, esc = _ROW_VALUE, _esc
    sep = _ROW_NL if first else "," + _ROW_NL
    last_keys: tuple[str, ...] | None = None
    pre: list[str] = []
    fast = _fast_row if _FAST_ROWS else None
    for t in rows:
        if fast is not None and t.merge is None and type(t) is TensorDiff:
            out.append(sep + fast(t))
            sep = "," + _ROW_NL
            continue
        d = t.to_dict()
        keys = tuple(d)
        if keys != last_keys:
            if not all(type(k) is str for k in keys):
                raise _Unsupported
            pre = ["{" + _ROW_IN + _esc(keys[0]) + ": "] + ["," + _ROW_IN + _esc(k) + ": " for k in keys[1:]]
            last_keys = keys
        try:
            # None and str, most of a row's values, without a call through the table.
            out.append(sep + "".join([p + ("null" if v is None else esc(v) if type(v) is str else enc[type(v)](v))
                                      for p, v in zip(pre, d.values())]) + _ROW_NL + "}")
        except KeyError:
            raise _Unsupported from None
        sep = "," + _ROW_NL
    return "".join(out)


# A row without a merge check, in one %-format: the bytes json.dumps(t.to_dict(), indent=2) gives at
# row depth (tested), ~5x faster than a dict and a loop over it. It knows the fields by position, so
# it is used only while TensorDiff has exactly these fields; a field added later turns it off until
# it is taught the new one (the dict path above writes any field).
_FAST_FIELDS = ("name", "status", "role", "drift", "stale", "dtype_old", "dtype_new", "shape_old", "shape_new",
                "numel", "hash_old", "hash_new", "max_abs_delta", "mean_abs_delta", "rel_l2", "changed_elements",
                "nan_new", "inf_new", "out_of_tolerance", "cause", "cause_detail", "merge")
_FAST_ROWS = ROW_FIELDS == _FAST_FIELDS
_ROW_TEMPLATE = "{" + ",".join(_ROW_IN + _esc(f) + ": %s" for f in _FAST_FIELDS[:-1]) + _ROW_NL + "}"


def _sc(v: Any) -> str:
    """A scalar as json writes it; anything else is left to the general path."""
    if v is None:
        return "null"
    t = type(v)
    if t is str:
        return _esc(v)
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return int.__repr__(v)
    if t is float:
        return _float(v)
    raise _Unsupported


def _stat(v: Any) -> str:
    """max/mean |Δ| and rel L2: to_dict writes their Inf/NaN as strings."""
    if type(v) is float and (v != v or v == _INF or v == -_INF):
        return '"nan"' if v != v else '"inf"' if v > 0 else '"-inf"'
    return _sc(v)


def _shape_json(v: Any) -> str:
    return "null" if v is None else _int_list(v)


#: cause_detail key sets -> the %-template of their object at row depth (a handful of causes, each one set).
_DETAIL_TEMPLATES: dict[tuple[str, ...], str] = {}


def _detail_json(d: Any) -> str:
    if d is None:
        return "null"
    if type(d) is not dict:
        raise _Unsupported
    keys = tuple(d)
    template = _DETAIL_TEMPLATES.get(keys)
    if template is None:
        if not keys or not all(type(k) is str for k in keys):
            return _nested({k: _json_float(v) if isinstance(v, float) else v for k, v in d.items()})
        template = "{" + ",".join(_ROW_IN2 + _esc(k).replace("%", "%%") + ": %s" for k in keys) + _ROW_IN + "}"
        if len(_DETAIL_TEMPLATES) < 64:
            _DETAIL_TEMPLATES[keys] = template
    try:
        return template % tuple(map(_stat, d.values()))
    except _Unsupported:  # a list (sparse_rows' first rows) or another nested value
        return _nested({k: _json_float(v) if isinstance(v, float) else v for k, v in d.items()})


def _str_or_null(v: Any) -> str:
    if v is None:
        return "null"
    if type(v) is not str:
        raise _Unsupported
    return _esc(v)


def _fast_row(t: TensorDiff) -> str:
    (name, status, role, drift, stale, dto, dtn, so, sn, numel, ho, hn, mx, mean, rel, ch, nan, inf, oot, cause,
     detail, _merge) = row_values(t)
    if type(name) is not str or type(status) is not str or type(role) is not str or type(drift) is not bool \
            or type(stale) is not bool:
        raise _Unsupported
    if mx is None and mean is None and rel is None and ch is None and nan is None and inf is None and oot is None \
            and cause is None and detail is None:  # no numbers: an identical, added, removed or reshaped tensor
        return _ROW_TEMPLATE % (
            _esc(name), _esc(status), _esc(role), "true" if drift else "false", "true" if stale else "false",
            _str_or_null(dto), _str_or_null(dtn), _shape_json(so), _shape_json(sn), _sc(numel), _str_or_null(ho),
            _str_or_null(hn), "null", "null", "null", "null", "null", "null", "null", "null", "null")
    return _ROW_TEMPLATE % (
        _esc(name), _esc(status), _esc(role), "true" if drift else "false", "true" if stale else "false",
        _str_or_null(dto), _str_or_null(dtn), _shape_json(so), _shape_json(sn), _sc(numel), _str_or_null(ho),
        _str_or_null(hn), _stat(mx), _stat(mean), _stat(rel), _sc(ch), _sc(nan), _sc(inf), _sc(oot),
        _str_or_null(cause), _detail_json(detail))


def _md_escape(s: str) -> str:
    """Plain Markdown text inside a table or heading: backslash escapes apply here."""
    return (printable(s).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
            .replace("*", "\\*").replace("_", "\\_").replace("<", "&lt;"))


def _md_code(s: str, in_table: bool = True) -> str:
    """``s`` as a code span that shows it verbatim, even with backticks or pipes in it.

    Backslash escapes do not work inside a code span, so a backtick in the
    name is handled by a longer fence (CommonMark), and ``|`` by GFM's table
    rule (``\\|`` is unescaped before the cell is parsed, even inside code).
    """
    text = printable(s).replace("|", "\\|") if in_table else printable(s)
    run = longest = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip(" ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown(report: DiffReport, show_all: bool = False, max_rows: int = MARKDOWN_MAX_ROWS) -> str:
    s = report.summary()
    icon = "❌" if report.failed else "⚠️" if s["stale"] else "✅"
    out = [f"### ckptdiff {icon} {_md_escape(verdict_line(report))}", ""]
    why = cause_groups(report)
    if why:
        out += [f"- {_md_escape(line)}" for line in why] + [""]
    man = _md_code(report.manifest_source, in_table=False) if report.manifest_source else "none"
    out.append(
        f"{_md_code(report.old.path, False)} → {_md_code(report.new.path, False)} · manifest: {man} · "
        f"atol {report.atol:g} · rtol {report.rtol:g} · fail on {report.fail_on}"
    )
    out.append("")
    cols = [*STATUSES, "drifted", "stale"]
    out.append("| " + " | ".join(_STATUS_LABEL.get(c, c) for c in cols) + " |")
    out.append("|" + "---:|" * len(cols))
    out.append("| " + " | ".join(f"**{s[c]}**" if c == "drifted" and s[c] else str(s[c]) for c in cols) + " |")
    rows = ordered(report, show_all)
    merge = report.lora is not None
    if rows:
        out += ["", "| | tensor | status | " + ("merge | " if merge else "") + "role | dtype | shape | max \\|Δ\\| | "
                "mean \\|Δ\\| | rel L2 | changed elements | cause |",
                "|---|---|---|" + ("---|" if merge else "") + "---|---|---|---:|---:|---:|---:|---|"]
        for t in rows[:max_rows]:
            mark = ("🔴 merge-off" if flag(t) == "MERGE-OFF" else "🔴 drift" if flag(t) == "DRIFT" else
                    "🟡 stale" if t.stale else "≤ tol" if flag(t) == "<=tol" else "")
            out.append(
                f"| {mark} | {_md_code(t.name)} | {_STATUS_LABEL[t.status]} | "
                + (f"{fmt_merge(t)} | " if merge else "") + f"{t.role} | "
                f"{_md_escape(fmt_dtype(t))} | {fmt_shape(t)} | {fmt_num(t.max_abs_delta)} | "
                f"{fmt_num(t.mean_abs_delta)} | {fmt_num(t.rel_l2)} | {fmt_changed(t)} | "
                f"{_md_escape(words(t.cause, t.cause_detail))} |"
            )
        if len(rows) > max_rows:
            out.append("")
            out.append(f"…and {len(rows) - max_rows} more rows (run with `--format json` for all).")
    hidden = s["identical"] - sum(1 for t in rows if t.status == "identical")
    if hidden:
        out += ["", f"{_plural(hidden, 'identical tensor')} not shown."]
    return "\n".join(out) + "\n"


def _gh_data(s: str) -> str:
    """Escape a workflow command's message, as GitHub's runner unescapes it."""
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(s: str) -> str:
    """Escape a property value (``file=``, ``title=``): also ``:`` and ``,``, which end a property."""
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def _gh_file(report: DiffReport) -> str:
    """``file=NEW,`` so annotations name the checkpoint they are about.

    Only for a real path: a store ref (``DIR@ID``) or an in-memory
    checkpoint is not a file GitHub could point at.
    """
    side = report.new
    if side.format == "store" or not side.path or side.path.startswith("<"):
        return ""
    return f"file={_gh_prop(printable(side.path))},"


def _gh(level: str, props: str, title: str, message: str) -> str:
    # Names are made printable first: an ESC or a bidi override in a tensor name
    # must not reach the log viewer, while %, CR, LF, ':' and ',' are escaped
    # by GitHub's own rules (data: % CR LF; properties: those plus ':' and ',').
    return f"::{level} {props}title={_gh_prop(printable(title))}::{_gh_data(printable(message))}"


def render_github(report: DiffReport) -> str:
    """GitHub Actions workflow commands: one annotation per drifted / stale tensor, then a summary."""
    out: list[str] = []
    where = _gh_file(report)
    for t in report.tensors if report.lora is not None else ():
        if _merge_failed(t):
            outside = t.merge is not None and t.merge.verdict == "changed-outside"
            title = "changed outside the adapter" if outside else "merge-off"
            out.append(_gh("error", where, f"ckptdiff: {title}: {t.name}",
                           f"{t.name} {'is not in the adapter but ' if outside else ''}{describe(t)}"))
    for t in report.drifted if report.lora is None else ():  # a merge check words its own annotations
        out.append(_gh("error", where, f"ckptdiff: frozen tensor drifted: {t.name}",
                       f"{t.name} is frozen but {describe(t)}"))
    for t in report.stale:
        out.append(_gh("warning", where, f"ckptdiff: trainable tensor never updated: {t.name}",
                       f"{t.name} is trainable but bitwise identical: check that it is in the optimizer"))
    failed, reasons = report.verdict()
    if failed and report.fail_on == "change":
        for r in reasons[:50]:
            out.append(_gh("error", where, "ckptdiff: tensor changed", r))
        if len(reasons) > 50:
            out.append(_gh("error", where, "ckptdiff: tensor changed",
                           f"…and {len(reasons) - 50} more changed tensors (run with --format json for all)"))
    level = "error" if failed else "notice"
    out.append(_gh(level, "", "ckptdiff", verdict_line(report) + " | " + summary_line(report)))
    out.append(printable(summary_line(report)))
    out.append(verdict_line(report))
    return "\n".join(out) + "\n"


def render_table(report: DiffReport, file: IO[str], *, show_all: bool = False,
                 color: bool | None = None, width: int | None = None) -> None:
    """A rich table on ``file``; colours follow the terminal and NO_COLOR unless ``color`` forces them.

    Off a terminal (a pipe, a file, a CI log) the text has no colours and
    rich is not needed: it is written directly, the same characters rich
    would print (tested), without the ~30 ms that importing rich's console
    costs.
    """
    if color is not True and not _may_be_terminal(file):
        _plain_table(report, file, show_all, 160 if width is None else width)
        return
    from rich.console import Console
    from rich.text import Text

    kwargs: dict[str, Any] = {"file": file, "highlight": False, "soft_wrap": False, "emoji": False}
    if color is False:
        kwargs["no_color"] = True
        kwargs["color_system"] = None
    elif color is True:
        kwargs["force_terminal"] = True
    console = Console(**kwargs)
    if width is not None:
        console.width = width
    elif not console.is_terminal:
        console.width = 160  # logs and files: no terminal to fit, do not fold numbers

    rows = ordered(report, show_all)
    system = console._color_system  # None when not a terminal, forced off, or colours refused
    # Paths are Text, never markup: a file named "[red]x" must print as itself.
    console.print(Text.assemble((printable(report.old.path), "bold"), " -> ", (printable(report.new.path), "bold")),
                  soft_wrap=True)  # a long path is one line (the terminal may wrap it, rich does not)
    if rows:
        dropped = _print_table(console.file, rows, console.width, None if system is None else _rich_paint(console))
        if dropped:
            for line in _fit(_narrow_line(dropped), console.width):
                console.print(line, style="dim", markup=False, highlight=False, soft_wrap=True)
    for line in _fit(_hidden_line(report, rows), console.width):
        console.print(line, style="dim", markup=False, highlight=False, soft_wrap=True)
    console.print(summary_line(report), highlight=False, markup=False, soft_wrap=True)
    for line in cause_lines(report):  # why, just above the verdict (which stays the last line)
        console.print(Text(printable(line), style="red"), soft_wrap=True)
    style = "bold red" if report.failed else "bold yellow" if report.stale else "bold green"
    console.print(Text(verdict_line(report), style=style), soft_wrap=True)


def _may_be_terminal(file: IO[str]) -> bool:
    """Whether rich might colour ``file`` (a terminal, colours forced by the environment, a notebook)."""
    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1" or "ipykernel" in sys.modules:
        return True
    try:
        return file.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or closed: rich decides
        return True


def _fit(text: str, width: int) -> list[str]:
    """A note's lines at most ``width`` wide, broken between words (none for no note)."""
    if len(text) <= width:
        return [text] if text else []
    import textwrap

    return textwrap.wrap(text, max(width, 20), break_on_hyphens=False)


def _narrow_line(dropped: list[str]) -> str:
    return f"(terminal too narrow for: {', '.join(dropped)}; widen it, or use --format json)"


def _hidden_line(report: DiffReport, rows: list[TensorDiff]) -> str:
    hidden = report.summary()["identical"] - sum(1 for t in rows if t.status == "identical")
    return f"({_plural(hidden, 'identical tensor')} hidden; --all shows them)" if hidden else ""


def _plain_table(report: DiffReport, file: IO[str], show_all: bool, width: int) -> None:
    """render_table without colours, without rich: the lines its console prints, as plain text."""
    rows = ordered(report, show_all)
    file.write(f"{printable(report.old.path)} -> {printable(report.new.path)}\n")
    lines = []
    if rows:
        dropped = _print_table(file, rows, width, None)
        if dropped:
            lines += _fit(_narrow_line(dropped), width)
    lines += _fit(_hidden_line(report, rows), width) + [summary_line(report)]
    lines += [printable(line) for line in cause_lines(report)] + [verdict_line(report)]
    file.write("".join(line + "\n" for line in lines))


def _rich_paint(console: Any) -> Callable[[str], tuple[str, str]]:
    """The escape codes that open and close a style on ``console`` (which has colours)."""
    from rich.style import Style

    def paint(style: str) -> tuple[str, str]:
        st = Style.parse(style)
        if console.no_color:
            st = st.without_color
        start, _, end = st.render("\0", color_system=console._color_system).partition("\0")
        return start, end

    return paint


#: Table columns: (key, header, right-aligned). The first two always stay.
_COLUMNS = (("flag", "", False), ("name", "tensor", False), ("status", "status", False), ("merge", "merge", False),
            ("role", "role", False),
            ("dtype", "dtype", False), ("shape", "shape", False), ("max", "max |Δ|", True),
            ("mean", "mean |Δ|", True), ("rel", "rel L2", True), ("changed", "changed", True),
            ("cause", "cause", False))
#: On a narrow terminal, columns are dropped in this order until the rest fit
#: with the names readable (a name folded three characters wide helps nobody).
_DROP_ORDER = ("mean", "dtype", "shape", "cause", "role", "changed", "rel", "status")
_NAME_MIN = 24


def _cell_columns(rows: list[TensorDiff]) -> dict[str, list[str]]:
    """Every table cell, a list per column (one pass of cheap reads per column, not a dict per row)."""
    return {"flag": [flag(t) for t in rows], "name": [printable(t.name) for t in rows],
            "status": [_STATUS_LABEL[t.status] for t in rows], "merge": [fmt_merge(t) for t in rows],
            "role": [t.role for t in rows], "dtype": [fmt_dtype(t) for t in rows],
            "shape": [fmt_shape(t) for t in rows], "max": [fmt_num(t.max_abs_delta) for t in rows],
            "mean": [fmt_num(t.mean_abs_delta) for t in rows], "rel": [fmt_num(t.rel_l2) for t in rows],
            "changed": [fmt_changed(t) for t in rows], "cause": [t.cause or "" for t in rows]}


def _row_style(t: TensorDiff) -> str | None:
    return ("red" if t.drift or _merge_failed(t) else "yellow" if t.stale else "dim" if t.status == "identical"
            else None)


def _cell_len(text: str) -> int:
    """Terminal cells ``text`` takes: its length for printable ASCII (every generated cell and most
    names; the headers' Δ is one cell too), else what rich measures (wide and zero-width characters)."""
    if text.isprintable() and (text.isascii() or text.replace("Δ", "").isascii()):  # Δ: the headers' one
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


def _column_width(head: str, column: list[str]) -> int:
    whole = "".join(column)
    if whole.isascii() and whole.isprintable():
        return max(len(head), max(map(len, column), default=0))
    return max([_cell_len(head)] + [_cell_len(c) for c in column])


def _table(rows: list[TensorDiff], width: int) -> tuple[list[tuple[str, str, bool]], dict[str, list[str]],
                                                         dict[str, int], list[str]]:
    """Columns that fit ``width``, each column's cells, column widths, and the headers dropped."""
    cells = _cell_columns(rows)
    need = {key: _column_width(head, cells[key]) for key, head, _ in _COLUMNS}
    columns = [c for c in _COLUMNS if c[0] != "merge" or any(t.merge is not None for t in rows)]
    keys = [key for key, _, _ in columns]

    def used(ks: list[str]) -> int:
        return sum(need[k] for k in ks if k != "name") + 2 * (len(ks) - 1)

    for key in _DROP_ORDER:
        if used(keys) + min(need["name"], _NAME_MIN) <= width:
            break
        keys.remove(key)
    need["name"] = max(min(need["name"], width - used(keys)), min(need["name"], _NAME_MIN))
    shown = [c for c in columns if c[0] in keys]
    return shown, cells, need, [head for k, head, _ in columns if k not in keys]


def _print_table(file: IO[str], rows: list[TensorDiff], width: int,
                 paint: Callable[[str], tuple[str, str]] | None) -> list[str]:
    """Write the rows as aligned columns, two spaces apart, names folded to their column.

    rich's Table measures and lays out every cell as objects, some 100 µs a
    row: the table of a 50,000-tensor diff took longer than the diff. The
    layout here is the one that Table drew (no box, no edge padding,
    numbers right-aligned, the header bold), made of plain strings; rich
    still decides the colours (terminal, NO_COLOR) and ``paint`` renders
    each style once (None: no colours). Returns the headers of the columns
    that did not fit.
    """
    shown, cells, need, dropped = _table(rows, width)

    def pad(text: str, key: str, right: bool) -> str:
        gap = need[key] - _cell_len(text)
        return (" " * gap + text if right else text + " " * gap) if gap > 0 else text

    painted: dict[str | None, tuple[str, str]] = {}

    def styled(text: str, style: str | None) -> str:
        if not text.strip():
            return text
        if style not in painted:
            painted[style] = ("", "") if style is None or paint is None else paint(style)
        start, end = painted[style]
        return start + text + end

    out = ["  ".join(styled(pad(head, key, right), "bold") for key, head, right in shown).rstrip(" ") + "\n"]
    name_width = need["name"]
    names = cells["name"]
    if paint is None and _column_width("", names) <= name_width:
        # No colours and no name to fold: whole columns padded by str methods, joined line by line.
        padded = []
        for key, _head, right in shown:
            column, w = cells[key], need[key]
            if "".join(column).isascii():
                padded.append([c.rjust(w) for c in column] if right else [c.ljust(w) for c in column])
            else:
                padded.append([pad(c, key, right) for c in column])
        out.extend("  ".join(parts).rstrip(" ") + "\n" for parts in zip(*padded))
        file.write("".join(out))
        return dropped
    from rich.cells import chop_cells

    for i, t in enumerate(rows):
        style = _row_style(t)
        bold = "bold" if style is None else f"bold {style}"
        name = names[i]
        parts = chop_cells(name, name_width) if _cell_len(name) > name_width else [name]
        for n, piece in enumerate(parts):
            line = [styled(pad(piece if key == "name" else cells[key][i] if n == 0 else "", key, right),
                           bold if key == "flag" else style) for key, _head, right in shown]
            out.append("  ".join(line).rstrip(" ") + "\n")
    file.write("".join(out))
    return dropped


def render(report: DiffReport, fmt: str, file: IO[str], *, show_all: bool = False,
           color: bool | None = None) -> None:
    """Write ``report`` to ``file`` in one of :data:`FORMATS`."""
    if fmt == "table":
        render_table(report, file, show_all=show_all, color=color)
    elif fmt == "json":
        write_json(report, file, show_all)
    elif fmt == "markdown":
        file.write(render_markdown(report, show_all=show_all))
    elif fmt == "github":
        file.write(render_github(report))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


__all__ = ["FORMATS", "render", "render_json", "write_json", "render_markdown", "render_github", "render_table",
           "verdict_line", "summary_line", "ordered"]
