"""Plain-text formatting shared by every screen.

Kept free of Textual so it can be tested directly. Numbers, shapes and
dtypes come from :mod:`ckptdiff.display`, the CLI's own formatter, so a value
reads the same in the TUI as in ``ckptdiff diff``. Times are formatted
relative to an injected clock: the app takes ``clock=`` so snapshot tests can
pin "now" and never render a wall-clock time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ckptdiff.display import dtype_of, num, shape_of  # re-exported: the screens' one formatter
from ckptdiff.store.model import is_per_tensor_metric

__all__ = ["ago", "num", "metric", "shape_of", "dtype_of", "short_hash", "metric_columns", "PREFERRED_METRICS"]

#: Metric names shown first when a snapshot records several, in this order.
PREFERRED_METRICS = ("loss", "val_loss", "eval_loss", "train_loss", "accuracy", "acc", "val_acc", "lr")


def ago(t: float | None, now: float) -> str:
    """'just now', '42s ago', '5m ago', '3h ago', '2d ago', or a date for old ones."""
    if t is None:
        return "-"
    dt = now - t
    if dt < 0:
        return "in future"
    if dt < 2:
        return "just now"
    if dt < 60:
        return f"{int(dt)}s ago"
    if dt < 3600:
        return f"{int(dt // 60)}m ago"
    if dt < 86400:
        return f"{int(dt // 3600)}h ago"
    if dt < 86400 * 60:
        return f"{int(dt // 86400)}d ago"
    import time
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def metric(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if x != x or x in (math.inf, -math.inf):
        return str(x)
    return f"{x:.4g}"


def short_hash(h: str | None, n: int = 10) -> str:
    return h[:n] if h else "-"


def metric_columns(all_metrics: Sequence[Mapping[str, Any]], limit: int = 2) -> list[str]:
    """The metric names worth a column: preferred ones first, then the most common.

    Per-tensor metrics (``drift_max_abs/<tensor>``) are never a column: they belong to one
    snapshot, and the drift column already counts the tensors that moved.
    """
    counts: dict[str, int] = {}
    for m in all_metrics:
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not is_per_tensor_metric(k):
                counts[k] = counts.get(k, 0) + 1
    chosen = [k for k in PREFERRED_METRICS if k in counts][:limit]
    rest = sorted((k for k in counts if k not in chosen), key=lambda k: (-counts[k], k))
    return (chosen + rest)[:limit]
