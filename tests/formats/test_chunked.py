"""Chunk tiling checks and C-order assembly of sub-blocks, with numpy slicing as the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from ckptdiff.checkpoint import TensorRef
from ckptdiff.errors import FormatError
from ckptdiff.formats.chunked import Chunk, assembled_pieces, check_tiling


def _chunks(arr: np.ndarray, blocks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[Chunk]:
    out = []
    for offsets, sizes in blocks:
        part = np.ascontiguousarray(arr[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])
        out.append(Chunk(offsets, sizes, lambda part=part: memoryview(part.reshape(-1).view(np.uint8))))
    return out


def _assemble(arr: np.ndarray, blocks) -> bytes:
    chunks = check_tiling("t", arr.shape, _chunks(arr, blocks), "here")
    ref = TensorRef("t", "float32", arr.shape, pieces=assembled_pieces(arr.shape, arr.itemsize, chunks))
    return b"".join(bytes(c) for c in ref.chunks(28))  # an odd chunk size: runs are re-cut


ARR = np.arange(7 * 9 * 4, dtype=np.float32).reshape(7, 9, 4)
LAYOUTS = {
    "rows": [((0, 0, 0), (3, 9, 4)), ((3, 0, 0), (4, 9, 4))],
    "columns": [((0, 5, 0), (7, 4, 4)), ((0, 0, 0), (7, 5, 4))],
    "grid": [((r0, c0, 0), (r1 - r0, c1 - c0, 4))
             for r0, r1 in ((0, 3), (3, 7)) for c0, c1 in ((0, 2), (2, 5), (5, 9))],
    "bricks": [((0, 0, 0), (3, 4, 4)), ((0, 4, 0), (3, 5, 4)), ((3, 0, 0), (4, 6, 4)), ((3, 6, 0), (4, 3, 4))],
    "innermost": [((0, 0, 0), (7, 9, 1)), ((0, 0, 1), (7, 9, 3))],
    "with-empty": [((0, 0, 0), (7, 9, 4)), ((7, 0, 0), (0, 9, 4))],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_tiling_assembles_to_the_c_order_bytes(layout):
    assert _assemble(ARR, LAYOUTS[layout]) == ARR.tobytes()


def test_a_0d_tensor_is_its_one_chunk():
    arr = np.array(2.5, dtype=np.float32)
    assert _assemble(arr, [((), ())]) == arr.tobytes()


@pytest.mark.parametrize("blocks,message", [
    ([((0, 0, 0), (3, 9, 4))], "cover 108 of 252"),
    ([((0, 0, 0), (4, 9, 4)), ((3, 0, 0), (4, 9, 4))], "overlap"),
    ([((0, 0, 0), (7, 9, 4)), ((6, 8, 3), (1, 1, 1))], "overlap"),
    ([((0, 0, 0), (7, 9, 4)), ((5, 0, 0), (3, 9, 4))], "outside the tensor"),
    ([((0, 0), (7, 9))], "has 2 dims, the tensor 3"),
])
def test_bad_tilings_are_refused(blocks, message):
    with pytest.raises(FormatError, match=message):
        check_tiling("t", ARR.shape, _chunks(np.zeros((8, 10, 5), np.float32), blocks), "here")


def test_two_chunks_of_a_0d_tensor_overlap():
    chunk = Chunk((), (), lambda: memoryview(b"\0" * 4))
    with pytest.raises(FormatError, match="overlap"):
        check_tiling("t", (), [chunk, chunk], "here")
