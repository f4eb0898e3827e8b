"""Snapshot refs: the names a user may give a snapshot, resolved against history.

Forms, tried in this order: ``latest``, ``first``, ``latest~K`` (K snapshots
before the newest, in creation order), ``step:N`` (the newest snapshot at
step N), an exact id, a tag (the newest snapshot carrying it, so a tag such
as ``best`` can move forward), then a unique id prefix of at least
``MIN_PREFIX`` hex digits. An ambiguous prefix is an error that lists the
candidates rather than a guess.

Pure logic over (id, tag, step) rows; no database here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import CkptError

MIN_PREFIX = 4
_TILDE = re.compile(r"latest~(\d+)\Z")
_STEP = re.compile(r"step:(-?\d+)\Z")
_HEX = re.compile(r"[0-9a-f]+\Z")
_STEP_FORM = re.compile(r"step:")  # any tag starting like step:N is reserved, even step:x
MAX_TAG = 200

FORMS = "an id or unique id prefix, a tag, step:N, latest, latest~K or first"


def check_tag(tag: str) -> str:
    """Refuse a tag that no ref could ever name, before it is recorded.

    Refs are tried as ``latest``, ``first``, ``latest~K``, ``step:N`` and ids
    before tags, and ``DIR@REF`` splits at the last ``@``; a tag that looks
    like one of those, is blank, or holds ``@`` or a control character would
    be stored but unreachable (or reachable only by accident).
    """
    if not isinstance(tag, str):
        raise CkptError(f"a tag must be a string, got {type(tag).__name__}")
    if not tag.strip():
        raise CkptError("a tag cannot be empty")
    if tag != tag.strip():
        raise CkptError(f"tag {tag!r} has leading or trailing spaces")
    if "@" in tag:
        raise CkptError(f"tag {tag!r} contains '@', which separates DIR from REF in DIR@REF")
    if not tag.isprintable():
        raise CkptError(f"tag {tag!r} contains control or invisible characters")
    if tag in ("latest", "first") or _TILDE.match(tag) or _STEP_FORM.match(tag):
        raise CkptError(f"tag {tag!r} would be shadowed by the ref form of the same name "
                        "(latest, first, latest~K and step:N are reserved)")
    if len(tag) > MAX_TAG:
        raise CkptError(f"tag is {len(tag)} characters long; the limit is {MAX_TAG}")
    return tag


def looks_like_full_id(ref: str) -> bool:
    """Could ``ref`` be an exact snapshot id (worth one indexed lookup before the full resolver)?"""
    return len(ref) >= MIN_PREFIX and _HEX.match(ref) is not None


class RefRow(NamedTuple):
    id: str
    tag: str | None
    step: int | None


def resolve(ref: str, rows: Sequence[RefRow], where: str | None = None) -> int:
    """Index into ``rows`` (creation order) of the snapshot ``ref`` names."""
    ref = ref.strip()
    if not rows:
        raise CkptError(f"the store has no snapshots yet, so {ref!r} names nothing", where)
    n = len(rows)
    if ref == "latest":
        return n - 1
    if ref == "first":
        return 0
    m = _TILDE.match(ref)
    if m:
        k = int(m.group(1))
        if k >= n:
            raise CkptError(f"{ref!r}: the store has only {n} snapshot{'s' if n != 1 else ''}", where)
        return n - 1 - k
    m = _STEP.match(ref)
    if m:
        step = int(m.group(1))
        for i in range(n - 1, -1, -1):
            if rows[i].step == step:
                return i
        steps = sorted({r.step for r in rows if r.step is not None})
        shown = ", ".join(str(s) for s in steps[:10]) + (", …" if len(steps) > 10 else "")
        raise CkptError(f"no snapshot at step {step} (steps in the store: {shown or 'none'})", where)
    for i, r in enumerate(rows):
        if r.id == ref:
            return i
    for i in range(n - 1, -1, -1):
        if rows[i].tag == ref:
            return i
    low = ref.lower()
    if len(low) >= MIN_PREFIX and _HEX.match(low):
        hits = [i for i, r in enumerate(rows) if r.id.startswith(low)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            cands = ", ".join(rows[i].id for i in hits[:8]) + (", …" if len(hits) > 8 else "")
            raise CkptError(f"ambiguous snapshot ref {ref!r}: it prefixes {len(hits)} snapshot ids ({cands}); "
                            "give more digits", where)
    tags = sorted({r.tag for r in rows if r.tag})
    hint = f"; tags: {', '.join(tags[:10])}" if tags else ""
    raise CkptError(f"unknown snapshot ref {ref!r} (expected {FORMS}; latest is {rows[-1].id}{hint})", where)


__all__ = ["resolve", "check_tag", "RefRow", "MIN_PREFIX", "FORMS", "MAX_TAG"]
