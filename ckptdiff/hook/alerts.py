"""What the hook tells the user while training goes on: its warning classes, raised at the user's own line.

A warning that points into torch's optimizer or into ckptdiff is useless in
a log ("optimizer.py:487: DriftWarning"); :func:`warn` walks up to the first
frame outside both, which is the user's ``optimizer.step()`` or ``track()``.
"""

from __future__ import annotations

import os
import sys
import warnings


class DriftWarning(UserWarning):
    """A frozen tensor moved (``on_drift="warn"``)."""


class AuditWarning(UserWarning):
    """The attach-time audit found a likely mistake."""


class StoreWarning(UserWarning):
    """Writing a snapshot failed; training goes on (see ``Tracker.errors``)."""


class StaleWarning(UserWarning):
    """A trainable tensor is still bitwise equal to its baseline after a snapshot interval."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn(warning: Warning) -> None:
    """Warn at the user's line (their optimizer.step() or track() call), not inside torch or ckptdiff."""
    level = 1
    frame = sys._getframe(1)
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not (fname.startswith(_PACKAGE_DIR + os.sep) or f"{os.sep}torch{os.sep}" in fname):
            break
        frame = frame.f_back
        level += 1
    warnings.warn(warning, stacklevel=level + 1)


__all__ = ["DriftWarning", "AuditWarning", "StoreWarning", "StaleWarning", "warn"]
