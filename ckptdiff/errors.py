"""Errors a user can act on.

Everything that is the user's input being wrong (a missing file, a corrupt
header, an unknown ref) raises :class:`CkptError`. The CLI turns it into one
line, ``ckptdiff: error: PATH: what is wrong``, and exit code 2; anything
else escaping is a bug in ckptdiff.
"""

from __future__ import annotations

import os


class CkptError(Exception):
    """A problem with the user's input, reported as one line and exit 2."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class FormatError(CkptError):
    """The file exists but is not a valid checkpoint of the format it claims."""


class UnsupportedFormatError(CkptError):
    """The file's content matches no reader."""


class NothingSelected(CkptError):
    """``include`` globs that match none of the tensors of two non-empty checkpoints.

    A typo, not a pass: ``include=["encoder.*"]`` against names that start
    with ``model.encoder`` would otherwise compare nothing and report no
    change. The CLI words it with its ``--include`` flags.
    """

    def __init__(self, include: list[str], exclude: list[str], n_old: int, n_new: int) -> None:
        self.include, self.exclude, self.n_old, self.n_new = include, exclude, n_old, n_new
        what = f"include={include!r}" + (f" with exclude={exclude!r}" if exclude else "")
        super().__init__(self.describe(what))

    def describe(self, what: str) -> str:
        return (f"{what} selected none of the tensors ({self.n_old} in OLD, {self.n_new} in NEW), so nothing "
                "was compared; globs match whole names (e.g. 'encoder.*' or '*.weight')")
