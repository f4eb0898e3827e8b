"""Where a command's report goes: ``--output`` checked before the work, written atomically after it.

``ckptdiff diff -o`` and ``ckptdiff report -o`` share these rules: a report
never replaces a checkpoint, an input or a store's files; a regular file is
replaced atomically (a reader never sees half a report); a FIFO, a terminal
or ``/dev/stdout`` is written straight through.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import CkptError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import IO


def write_output(path: str, write: Callable[[IO[str]], None]) -> None:
    """Write a report to ``path`` (a file name, not ``-``) with ``write(stream)``."""
    if is_special(path):
        with open(path, "w", encoding="utf-8") as f:
            write(f)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise CkptError(f"cannot write the report: {e.strerror or e}", path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_special(path: str) -> bool:
    """A FIFO, a terminal, a device: something to write straight into, not to replace."""
    import stat
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False  # does not exist yet: a regular file will be created


def _near_a_store(path: str) -> bool:
    """Whether ``path``'s folder or the one above holds a store's database: the only places
    :func:`~ckptdiff.store.store.owning_store` looks, checked without importing the store
    (sqlite3 and the store's modules are ~10 ms of a diff's start-up)."""
    from ..store.layout import is_store
    parent = os.path.dirname(os.path.realpath(path))
    return any(is_store(d) for d in (parent, os.path.dirname(parent)))


def _refuse_to_clobber_a_checkpoint(path: str, inputs: tuple[str, ...]) -> None:
    """``-o model.safetensors`` (a slip for ``-o diff.json``) must not replace weights with a report."""
    if _near_a_store(path):
        from ..store.store import owning_store

        store = owning_store(path)
        if store is not None:
            raise CkptError(f"--output is inside the store {store} (its database, blobs/, packs/ or tmp/); "
                            "refusing to write the report there", path)
    if not os.path.isfile(path):
        return
    for spec in inputs:
        try:
            if os.path.exists(spec) and os.path.samefile(path, spec):
                raise CkptError("--output names one of the inputs (OLD, NEW or --manifest); "
                                "refusing to overwrite it with the report", path)
        except OSError:
            continue
    from ..formats import sniff

    try:
        fmt = sniff(path)
    except CkptError:
        return  # not a checkpoint (an earlier report, a log): replacing it is what -o means
    raise CkptError(f"--output is an existing {fmt} checkpoint; refusing to overwrite it with the report "
                    "(name a new file, or delete it first)", path)


def check_output(path: str | None, inputs: tuple[str, ...] = ()) -> None:
    """Refuse a bad ``--output`` before the long work that would fill it, not after."""
    if not path or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CkptError("--output is a directory; name a file", path)
    _refuse_to_clobber_a_checkpoint(path, inputs)
    if not os.path.isdir(parent):
        raise CkptError("cannot write the report: its directory does not exist", path)
    if not os.access(parent, os.W_OK) and not is_special(path):
        raise CkptError("cannot write the report: directory is not writable", path)
