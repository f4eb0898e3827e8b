"""How numbers, shapes and dtypes read on screen: one formatter for the CLI's reports and the TUI.

A value looks the same wherever a user meets it: ``0.0004`` in ``ckptdiff
diff``'s table, its Markdown, and the TUI's table and detail screen; a
change of layout is written ``old->new`` (ASCII, so CI logs, annotations
and terminals without Unicode fonts agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

#: Between the two sides of a changed shape or dtype.
ARROW = "->"


def num(x: float | None) -> str:
    """A delta for a table cell: '-' when unknown, '0' when exactly zero, else 4 significant digits."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.4g}"


def shape(s: Sequence[int] | None) -> str:
    """``(2, 3)``, ``(8,)`` for one dimension, ``()`` for a scalar, ``-`` when absent."""
    return "-" if s is None else "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def change(old: str | None, new: str | None) -> str:
    """One value when both sides agree, ``old->new`` when they differ, the present side otherwise."""
    if old is not None and new is not None and old != new:
        return f"{old}{ARROW}{new}"
    return new or old or "-"


def shape_of(t: Any) -> str:
    """A TensorDiff's shape cell."""
    return change(None if t.shape_old is None else shape(t.shape_old),
                  None if t.shape_new is None else shape(t.shape_new))


def dtype_of(t: Any) -> str:
    """A TensorDiff's dtype cell."""
    return change(t.dtype_old, t.dtype_new)


__all__ = ["ARROW", "num", "shape", "change", "shape_of", "dtype_of"]
