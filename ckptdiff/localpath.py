"""Refusing URLs where ckptdiff needs a local path.

``s3://bucket/store`` passed as a store would otherwise be taken as the
relative path ``s3:/bucket/store`` and a local directory of that name made
silently. The store is deliberately local: SQLite's WAL and ``flock`` do not
work on network filesystems or object storage, so a store there could lose
snapshots. The way to keep history in a bucket is a local store synced to it.
"""

from __future__ import annotations

import re

from .errors import CkptError

#: ``scheme://`` as RFC 3986 spells a scheme; a Windows drive (``C:\\``) never matches.
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def url_scheme(path: str) -> str | None:
    """The scheme of ``path`` when it is a URL (``s3``, ``gs``, ``https``...), else None."""
    m = _URL_RE.match(path)
    return m.group(1).lower() if m else None


def refuse_url(path: str, what: str) -> None:
    """CkptError when ``path`` is a URL; ``what`` is "store" or "checkpoint" (for the message)."""
    scheme = url_scheme(path)
    if scheme is None:
        return
    if what == "store":
        raise CkptError(f"is a URL ({scheme}://); a ckptdiff store must be a directory on a local filesystem "
                        "(SQLite WAL and flock do not work on network or object storage): keep the store "
                        f"on local disk and sync the directory to {scheme}:// with your usual tool", path)
    raise CkptError(f"is a URL ({scheme}://); ckptdiff reads local files: download the checkpoint first "
                    "(a DIR@REF must name a local store)", path)
