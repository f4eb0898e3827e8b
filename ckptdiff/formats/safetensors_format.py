"""The safetensors reader: our own strict header parser over a read-only mmap.

Why not ``safetensors.safe_open``: it hands out copies (numpy/torch arrays),
while the diff engine wants zero-copy byte views, and its errors do not name
the problem in a way we can show as one line. The format is small enough to
validate completely here:

``[8-byte LE header length N][N bytes of JSON header][data section]``, each
header entry ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to
the data section, plus an optional ``__metadata__`` str -> str map.

Reference: the ``safetensors`` library (its Rust ``read_metadata`` and
``Metadata::validate``), followed rule for rule: a header of at most
100,000,000 bytes of UTF-8 JSON (whitespace around the object is valid JSON
and accepted, as the writer itself pads with spaces); the tensors, sorted by
``data_offsets``, tile the data section exactly from byte 0 with no gap and
no overlap; each holds exactly ``numel * itemsize`` bytes; and the last one
ends exactly at the end of the file, so no bytes after the data (a polyglot
tail) can hide there. Stricter than the reference: a name listed twice is
refused (serde keeps one silently), ``__metadata__`` values must be strings
(as the reference requires), and dtypes ckptdiff has no canonical name for
are refused rather than skipped.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import weakref
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

from ..checkpoint import Checkpoint, SpanTable, check_shape
from ..dtypes import _BY_SAFETENSORS, from_safetensors
from ..errors import CkptError, FormatError
from ._common import map_file, numel, open_binary, with_path

#: A header larger than this is refused before it is read (the reference's MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
FORMAT = "safetensors"


def open_safetensors(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a .safetensors file lazily: its tensors are columns of one :class:`SpanTable` over a read-only map."""
    p = os.fspath(path)
    with open_binary(p) as f:
        mm = map_file(f, p)
        if mm is None:
            raise FormatError("file is empty (0 bytes)", p)
        try:
            n = _header_length(mm, p)
            data_start = 8 + n
            # Scanned in place and then dropped from the resident set: a copy would stay with the
            # process's heap after it is freed (20 MB for a 200,000-tensor header).
            with memoryview(mm)[8:data_start] as raw:
                names, dtypes, shapes, offsets, nbytes, metadata = _columns(raw, data_start, len(mm) - data_start, p)
            _drop_pages(mm, data_start)
        except BaseException:
            mm.close()
            raise
        fd = os.dup(f.fileno())  # for pread; outlives the file object
    whole = memoryview(mm)
    table = SpanTable(names, dtypes, shapes, offsets, nbytes, base=data_start, whole=whole, fd=fd,
                      source=os.path.basename(p))
    global _LAST
    _LAST = weakref.ref(table)
    ckpt = Checkpoint(p, FORMAT, table, metadata)

    def close() -> None:
        os.close(fd)
        whole.release()
        mm.close()

    ckpt.on_close(close)
    return ckpt


#: The table opened last: the next file's names are matched against its
#: names, so the second checkpoint of a pair shares the first one's name
#: strings (half the memory of a many-tensor diff) and the engine sees at
#: once that both list the same names in the same order.
_LAST: weakref.ref[SpanTable] | None = None


def _hint() -> list[str] | None:
    table = _LAST() if _LAST is not None else None
    return table.names if table is not None else None


def _header_length(buf: Any, path: str) -> int:
    """The header's length from the first 8 bytes, checked against the file size."""
    size = len(buf)
    if size < 8:
        raise FormatError(f"truncated: {size} bytes, too short for the 8-byte safetensors header length", path)
    n = int.from_bytes(buf[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"header claims {n} bytes, more than the {MAX_HEADER_BYTES:,}-byte limit", path)
    if n > size - 8:
        raise FormatError(f"truncated: header claims {n} bytes but the file has only {size - 8} after the length", path)
    return n


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _drop_pages(mm: mmap.mmap, end: int) -> None:
    """Unmap the header's pages from this process (they stay in the page cache): only a memory hint."""
    end -= end % mmap.PAGESIZE
    if _DONTNEED is not None and end >= 1 << 20:
        try:
            mm.madvise(_DONTNEED, 0, end)
        except (OSError, ValueError):
            pass


def _columns(raw: Any, data_start: int, data_len: int, path: str) -> tuple[
        list[str], list[str], list[tuple[int, ...]], Any, Any, dict[str, str]]:
    """(names, dtypes, shapes, offsets in the data section, nbytes, metadata) of a validated header.

    The common header takes the C scanner (``scan_columns``), which answers
    only when it can promise what :func:`_parse_header` would; anything
    else, and every error message, comes from ``_parse_header``.
    """
    hint = _hint()
    fast = scan_columns(raw, data_len, hint)
    raw = bytes(raw) if fast is None else raw  # the Python parser decodes it
    if fast is not None:
        names, dtypes, shapes, begins, sizes, meta_span, same = fast
        if same:
            names = hint  # the same strings in the same order: one list, and the engine sees it at once
        metadata: dict[str, str] = {}
        if meta_span is not None:
            metadata = _metadata(json.loads(bytes(raw[meta_span[0]:meta_span[1]])), path)
        return names, dtypes, shapes, memoryview(begins).cast("q"), memoryview(sizes).cast("q"), metadata
    tensors, metadata = _parse_header(raw, data_start, data_len, path)
    names = list(tensors)
    if hint is not None and names == hint:
        names = hint
    rows = tensors.values()
    return (names, [r[0] for r in rows], [r[1] for r in rows], [r[2] - data_start for r in rows],
            [r[3] - r[2] for r in rows], metadata)


def _metadata(info: Any, path: str) -> dict[str, str]:
    if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
        raise FormatError("__metadata__ must map strings to strings", path)
    return dict(info)


def _parse(buf: Any, path: str) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate the header against the file; returns name -> (dtype, shape, abs begin, abs end)."""
    size = len(buf)
    n = _header_length(buf, path)
    return _parse_header(bytes(buf[8:8 + n]), 8 + n, size - 8 - n, path)


def _parse_header(raw: bytes, data_start: int, data_len: int, path: str) -> tuple[
        dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate the header's JSON against the data section; returns name -> (dtype, shape, abs begin, abs end)."""
    try:
        text = raw.decode("utf-8")
        header = _loads(text)
    except UnicodeDecodeError:
        raise FormatError("header is not valid UTF-8", path) from None
    except _Duplicate as e:
        raise FormatError(f"header lists {e.args[0]!r} twice", path) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"header is not valid JSON ({e.msg} at byte {e.pos})", path) from None
    except RecursionError:
        raise FormatError("header JSON is nested too deeply", path) from None
    except ValueError as e:  # e.g. an integer literal of thousands of digits
        raise FormatError(f"header is not valid JSON ({str(e)[:120]})", path) from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object", path)

    if _SURROGATE_ESCAPE.search(text) and not _valid_unicode(header):
        raise FormatError("header holds a string with a lone UTF-16 surrogate escape, which is not valid Unicode "
                          "(the safetensors library refuses it)", path)
    metadata: dict[str, str] = {}
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    max_numel = _MAX_NUMEL
    by_code = _BY_SAFETENSORS
    for name, info in header.items():
        # The common entry, checked in a few type tests (a 200,000-tensor header
        # makes this loop the cost of opening the file); anything unusual
        # takes the full checks below, which say what is wrong. Dims in
        # 1..2**48 with a product up to 2**48 also fit the reference's u64.
        if type(info) is dict:
            code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            dt = by_code.get(code) if type(code) is str else None
            if (dt is not None and type(shape) is list and type(offsets) is list and len(offsets) == 2
                    and type(offsets[0]) is int and type(offsets[1]) is int and all(
                        type(d) is int and 0 < d <= max_numel for d in shape)):
                count = 1
                for d in shape:
                    count *= d
                begin, end = offsets
                if count <= max_numel and 0 <= begin and end == begin + count * dt.itemsize and end <= data_len:
                    out[name] = (dt.name, tuple(shape), data_start + begin, data_start + end)
                    spans.append((begin, end, name))
                    continue
        if name == "__metadata__":
            metadata = _metadata(info, path)
            continue
        if not isinstance(info, dict):
            raise FormatError(f"tensor {name!r}: header entry is not an object", path)
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise FormatError(f"tensor {name!r}: header entry lacks {', '.join(missing)}", path)
        try:
            dt = from_safetensors(info["dtype"])
            if not isinstance(info["shape"], list):
                raise FormatError(f"tensor {name!r}: shape must be a list, got {info['shape']!r}")
            shape = check_shape(name, info["shape"])
        except CkptError as e:
            if not e.message.startswith("tensor "):
                e = FormatError(f"tensor {name!r}: {e.message}")
            raise with_path(e, path) from None
        if not _fits_usize(shape, dt.itemsize):
            raise FormatError(f"tensor {name!r}: shape {list(shape)} overflows 64 bits (the safetensors library "
                              "refuses it)", path)
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise FormatError(f"tensor {name!r}: data_offsets must be two integers, got {offsets!r}", path)
        begin, end = offsets
        if not 0 <= begin <= end:
            raise FormatError(f"tensor {name!r}: invalid data_offsets [{begin}, {end}]", path)
        if end > data_len:
            raise FormatError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the data section "
                f"({data_len} bytes; file truncated?)", path)
        expected = numel(shape) * dt.itemsize
        if end - begin != expected:
            raise FormatError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                f"{dt.safetensors} {list(shape)} needs {expected}", path)
        out[name] = (dt.name, shape, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    # The reference's rule: sorted by offsets, the tensors tile the data section exactly.
    spans.sort()
    covered, previous = 0, ""
    for begin, end, name in spans:
        if begin < covered:
            raise FormatError(f"tensors {previous!r} and {name!r} overlap (bytes {begin}..{covered} of the data "
                              "section)", path)
        if begin > covered:
            raise FormatError(f"tensor {name!r}: bytes {covered}..{begin} of the data section belong to no tensor "
                              "(the safetensors library refuses gaps)", path)
        covered, previous = end, name
    if covered != data_len:
        raise FormatError(f"{data_len - covered} bytes after the last tensor's data (the safetensors library "
                          "refuses such a file: the data section must end where the last tensor ends)", path)
    return out, metadata


#: check_shape's bound on the element count.
_MAX_NUMEL = 1 << 48


def _loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys anywhere, fast when there are none.

    A hook on every object costs a Python call per tensor. Instead, parse
    plainly and count: every member of every object is a key followed by
    ``:``, so when the text holds exactly as many ``:`` as the parsed
    objects hold members (the header, each entry, ``__metadata__``), no key
    was dropped as a duplicate (and no string held a colon). Any other
    count, including objects nested deeper, re-parses with the hook, which
    finds the duplicate if there is one.
    """
    header = json.loads(text)
    if type(header) is dict:
        members = len(header) + sum(len(v) for v in header.values() if type(v) is dict)
        if members == text.count(":"):
            return header
    return json.loads(text, object_pairs_hook=_no_duplicates)


#: A JSON escape that may stand for half a surrogate pair: only then can a
#: string hold a lone surrogate (the raw bytes were valid UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _fits_usize(shape: tuple[int, ...], itemsize: int) -> bool:
    """The reference multiplies the dims left to right in u64 and fails on overflow, even before a 0 dim."""
    limit = 1 << 64
    n = 1
    for dim in shape:
        if dim >= limit:
            return False
        n *= dim
        if n >= limit:
            return False
    return n * itemsize < limit


def _valid_unicode(header: dict[str, Any]) -> bool:
    """serde_json refuses ``\\ud800``-style lone surrogates that Python's json accepts."""
    def ok(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    for key, info in header.items():
        if not ok(key):
            return False
        if isinstance(info, dict):
            for k, v in info.items():
                if not ok(k) or (isinstance(v, str) and not ok(v)):
                    return False
    return True


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C: a 2,000-tensor header calls this 2,001 times
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


try:
    from .. import _cheader
except ImportError:  # built without a C compiler: _parse reads every header
    _cheader = None  # type: ignore[assignment]

#: code -> (canonical name, itemsize), what _cheader.scan reads dtypes from (built on first use).
_SCAN_DTYPES: dict[str, tuple[str, int]] | None = None


def scan_columns(raw: bytes, data_len: int, hint: list[str] | None = None) -> tuple[Any, ...] | None:
    """The header ``raw`` of a file with ``data_len`` data bytes, read by the C module into columns.

    Returns ``(names, dtype_names, shapes, begins, nbytes, metadata_span,
    same_as_hint)`` (see ckptdiff/_cheader.c: begins and nbytes are native
    int64 bytes, relative to the data section; metadata_span is None or the
    ``(start, end)`` of the ``__metadata__`` object in ``raw``), or None when
    the header is not the plain common case or the module was not built:
    then _parse decides, and names what is wrong. Whatever this accepts,
    _parse accepts with the same tensors. With ``hint`` (the names of a
    similar file), equal names are hint's own str objects.
    """
    global _SCAN_DTYPES
    if _cheader is None:
        return None
    if _SCAN_DTYPES is None:
        _SCAN_DTYPES = {code: (dt.name, dt.itemsize) for code, dt in _BY_SAFETENSORS.items()}
    result: tuple[Any, ...] | None = _cheader.scan(raw, data_len, _SCAN_DTYPES, hint)
    return result
