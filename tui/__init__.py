"""The Textual app of ckptdiff, installed as ``ckptdiff.tui`` (from the top-level ``tui/`` folder).

``ckptdiff tui STORE`` browses a snapshot store's history; ``ckptdiff tui OLD
NEW`` shows one diff. Textual is the ``tui`` extra, so nothing here is
imported by ``import ckptdiff`` or the rest of the CLI.

Layout, one concept per module:

* data, no Textual: ``rows`` (filter/sort state, merging measured rows),
  ``history`` (the store's snapshots, bases, per-tensor history),
  ``measure`` (a pair's manifest, batches for the diff engine), ``fmt``
  (cell text). Verdicts come from ``ckptdiff.policy`` and numbers from
  ``ckptdiff.display``, as in the CLI;
* widgets: ``line_table`` (fast line-API table), ``tensor_table``,
  ``history_list``, ``filter_bar``;
* screens: ``history_screen``, ``pair_screen`` (sharing ``table_screen``),
  ``detail_screen``, ``help_screen``; ``app`` picks the first screen and
  adds the command palette entries; ``screenshot`` renders an SVG for docs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CkptdiffApp"]


def __getattr__(name: str) -> Any:
    if name == "CkptdiffApp":
        from .app import CkptdiffApp
        return CkptdiffApp
    raise AttributeError(f"module 'ckptdiff.tui' has no attribute {name!r}")
