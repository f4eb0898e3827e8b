"""How numbers, shapes and dtypes read on screen: one formatter for the CLI's reports and the TUI.

A value looks the same wherever a user meets it: ``0.0004`` in ``ckptdiff
diff``'s table, its Markdown, and the TUI's table and detail screen; a
change of layout is written ``old->new`` (ASCII, so CI logs, annotations
and terminals without Unicode fonts agree).
"""

from __future__ import annotations

from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

#: Between the two sides of a changed shape or dtype.
ARROW = "->"


def num(x: float | None) -> str:
    """A delta for a table cell: '-' when unknown, '0' when exactly zero, else 4 significant digits
    ('inf', '-inf' and 'nan' as the format writes them; a NaN never with a sign)."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if x != x:
        return "nan"
    return f"{x:.4g}"


#: Shapes already written: a model has few distinct shapes, and a many-tensor table writes each one
#: thousands of times (bounded, so a checkpoint of all-different shapes cannot grow it without end).
_SHAPE_TEXT: dict[tuple[int, ...], str] = {}
_SHAPE_TEXT_MAX = 4096


def shape(s: Sequence[int] | None) -> str:
    """``(2, 3)``, ``(8,)`` for one dimension, ``()`` for a scalar, ``-`` when absent."""
    if s is None:
        return "-"
    key = tuple(s)
    text = _SHAPE_TEXT.get(key)
    if text is None:
        text = "(" + ", ".join(map(str, key)) + ("," if len(key) == 1 else "") + ")"
        if len(_SHAPE_TEXT) < _SHAPE_TEXT_MAX:
            _SHAPE_TEXT[key] = text
    return text


def change(old: str | None, new: str | None) -> str:
    """One value when both sides agree, ``old->new`` when they differ, the present side otherwise."""
    if old is not None and new is not None and old != new:
        return f"{old}{ARROW}{new}"
    return new or old or "-"


def shape_of(t: Any) -> str:
    """A TensorDiff's shape cell."""
    old, new = t.shape_old, t.shape_new
    if old is not None and old == new:  # the common row: one layout on both sides
        return shape(new)
    return change(None if old is None else shape(old), None if new is None else shape(new))


def dtype_of(t: Any) -> str:
    """A TensorDiff's dtype cell."""
    return change(t.dtype_old, t.dtype_new)


__all__ = ["ARROW", "num", "shape", "change", "shape_of", "dtype_of"]
