"""Write a snapshot back out as a plain checkpoint file, bit for bit.

safetensors is written by the streaming writer in
:mod:`ckptdiff.writers.safetensors` (header, then each tensor's bytes
straight from its blob), so exporting a model larger than memory works and
bf16/fp8 never pass through a float conversion. ``pt`` is written the same
way by :mod:`ckptdiff.writers.pt` (the zip layout ``torch.save`` uses,
without importing torch).

Every tensor is re-hashed while it is written (by the snapshot's blob
reader) and compared with its recorded hash, so a corrupt blob fails the
export instead of producing a wrong file.
Output goes to a temp file renamed into place: no half-written exports.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

from ..checkpoint import Checkpoint, TensorRef
from ..writers import pt as pt_writer
from ..writers import safetensors as st_writer
from .blobs import IO_BYTES, _write_all

FORMATS = ("safetensors", "pt")


def _checked_chunks(t: TensorRef, out: str):  # type: ignore[no-untyped-def]
    """The tensor's bytes, in write-sized chunks.

    The refs come from ``Store.open_snapshot``, whose blob readers re-hash as
    they stream and raise at the end on a mismatch, so every byte is checked
    exactly once and a corrupt blob aborts the export before the rename.
    """
    return t.chunks(IO_BYTES)


def _temp_beside(out: str) -> str:
    d = os.path.dirname(os.path.abspath(out))
    return os.path.join(d, f".{os.path.basename(out)}.{secrets.token_hex(6)}.tmp")


def write_safetensors(ckpt: Checkpoint, out: str, metadata: dict[str, str],
                      advance: Callable[[int], None]) -> None:
    tmp = _temp_beside(out)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        st_writer.write(lambda b: _write_all(fd, b), dict(ckpt.items()), metadata,
                        lambda t: _checked_chunks(t, out), advance)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_pt(ckpt: Checkpoint, out: str, advance: Callable[[int], None]) -> None:
    """A ``torch.save``-compatible .pt of the snapshot's tensors, streamed (see writers.pt); no torch needed."""
    tmp = _temp_beside(out)
    try:
        pt_writer.write(tmp, dict(ckpt.items()), lambda t: _checked_chunks(t, out), advance,
                        serialization_id=str(int.from_bytes(secrets.token_bytes(16), "little")).zfill(40)[:40])
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


__all__ = ["FORMATS", "write_safetensors", "write_pt"]
