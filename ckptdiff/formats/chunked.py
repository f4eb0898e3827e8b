"""Tensors stored as rectangular chunks: checking that the chunks tile the tensor, and streaming it.

Distributed checkpoints (torch.distributed.checkpoint, FSDP shard sets) keep
a tensor as several row-major sub-blocks, each with its offset in the global
tensor. A :class:`~ckptdiff.checkpoint.TensorRef` needs the global tensor's
bytes in C order, so this module turns a validated chunk set into a
``pieces()`` stream without ever materialising the tensor:

* a tensor split along dim 0 only (FSDP) is the chunks' bytes one after
  another, sorted by their row offset;
* any other split (tensor parallel along dim 1, 2-D grids) is read as runs:
  for each index of the dims before the last split dim, the chunks crossing
  it contribute one contiguous run each, in column order. Runs are as long as
  the chunk's extent along that dim times everything after it, so the cost is
  one slice per run, never one per element.

The chunk set is untrusted input: :func:`check_tiling` proves it covers
every element exactly once (every chunk inside the tensor, no two chunks
overlapping, volumes adding up to the tensor's) before anything is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import FormatError

#: Pairwise overlap tests allowed for one tensor. Real layouts need about one
#: per chunk; a crafted chunk list that would need more is refused, not ground through.
MAX_OVERLAP_TESTS = 1 << 22


@dataclass(frozen=True)
class Chunk:
    """One stored sub-block: where it sits in the tensor, and how to view its bytes (C order)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    view: Callable[[], memoryview]
    #: ``(fd, offset)`` when the bytes lie contiguously in an open file (for ``pread``).
    span: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def check_tiling(name: str, shape: tuple[int, ...], chunks: Sequence[Chunk], where: str) -> list[Chunk]:
    """The non-empty chunks of ``chunks``, after proving they tile ``shape`` exactly.

    Raises FormatError naming the first chunk outside the tensor, the first
    overlapping pair, or the number of elements no chunk covers.
    """
    nd = len(shape)
    kept: list[Chunk] = []
    for c in chunks:
        if len(c.offsets) != nd or len(c.sizes) != nd:
            raise FormatError(f"tensor {name!r}: chunk at {c.offsets} has {len(c.sizes)} dims, "
                              f"the tensor {nd}", where)
        for o, s, dim in zip(c.offsets, c.sizes, shape):
            if o < 0 or s < 0 or o + s > dim:
                raise FormatError(f"tensor {name!r}: chunk at {c.offsets} of size {c.sizes} lies outside "
                                  f"the tensor's shape {shape}", where)
        if c.numel:
            kept.append(c)
    _check_no_overlap(name, kept, where)
    covered = sum(c.numel for c in kept)
    total = math.prod(shape)
    if covered != total:
        raise FormatError(f"tensor {name!r}: its chunks cover {covered} of {total} elements "
                          "(a gap in the stored tensor)", where)
    return kept


def _check_no_overlap(name: str, chunks: list[Chunk], where: str) -> None:
    """Sweep along dim 0: only chunks whose row ranges meet are compared."""
    if not chunks:
        return
    if not chunks[0].offsets:  # 0-d: any second chunk overlaps the first
        if len(chunks) > 1:
            raise FormatError(f"tensor {name!r}: {len(chunks)} chunks overlap (a 0-d tensor has one)", where)
        return
    ordered = sorted(chunks, key=lambda c: c.offsets)
    active: list[Chunk] = []
    tests = 0
    for c in ordered:
        row = c.offsets[0]
        active = [a for a in active if a.offsets[0] + a.sizes[0] > row]
        tests += len(active)
        if tests > MAX_OVERLAP_TESTS:
            raise FormatError(f"tensor {name!r}: too many interleaved chunks ({len(chunks)}) to check", where)
        for a in active:
            if all(ao < co + cs and co < ao + as_
                   for ao, as_, co, cs in zip(a.offsets, a.sizes, c.offsets, c.sizes)):
                raise FormatError(f"tensor {name!r}: chunks at {a.offsets} and {c.offsets} overlap", where)
        active.append(c)


def assembled_pieces(shape: tuple[int, ...], itemsize: int,
                     chunks: Sequence[Chunk]) -> Callable[[], Iterator[memoryview]]:
    """A ``TensorRef.pieces`` callable yielding the tiled tensor's bytes in C order.

    ``chunks`` must have passed :func:`check_tiling`.
    """
    def pieces() -> Iterator[memoryview]:
        views: dict[int, memoryview] = {}
        for i, lo, n in _runs(shape, itemsize, chunks):
            mv = views.get(i)
            if mv is None:
                mv = views[i] = chunks[i].view()
            yield mv[lo:lo + n]
    return pieces


def _runs(shape: tuple[int, ...], itemsize: int, chunks: Sequence[Chunk]) -> Iterator[tuple[int, int, int]]:
    """(chunk index, byte offset in the chunk, byte length) for each contiguous run, in C order."""
    nd = len(shape)
    split = [d for d in range(nd) if any(c.sizes[d] != shape[d] for c in chunks)]
    if not split:  # one chunk holds it all
        if chunks:
            yield 0, 0, chunks[0].numel * itemsize
        return
    k = split[-1]  # every dim after k is whole in every chunk: a run spans it
    inner = math.prod(shape[k + 1:]) * itemsize
    strides = [[math.prod(c.sizes[j + 1:]) * itemsize for j in range(k)] for c in chunks]

    def walk(d: int, members: list[int], index: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
        if d == k:
            for i in sorted(members, key=lambda i: chunks[i].offsets[k]):
                c = chunks[i]
                lo = sum((index[j] - c.offsets[j]) * strides[i][j] for j in range(k))
                yield i, lo, c.sizes[k] * inner
            return
        cuts = sorted({p for i in members for p in (chunks[i].offsets[d], chunks[i].offsets[d] + chunks[i].sizes[d])})
        for a, b in zip(cuts, cuts[1:]):
            band = [i for i in members if chunks[i].offsets[d] <= a < chunks[i].offsets[d] + chunks[i].sizes[d]]
            for pos in range(a, b):
                yield from walk(d + 1, band, (*index, pos))

    yield from walk(0, list(range(len(chunks))), ())
