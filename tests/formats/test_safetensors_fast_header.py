"""The safetensors header's fast paths decide exactly as the full checks do.

Common entries are accepted in a few type tests and duplicate keys are ruled
out by counting; anything unusual must reach the full checks. Each header
here is parsed twice, once as shipped and once with the fast path switched
off, and must give the same tensors or the same one-line error.

The C scan (ckptdiff._cheader, when built) reads the plain common header
straight into columns and answers None for anything else: whatever it
accepts, the Python parser accepts with the same tensors and metadata, and
whatever the Python parser refuses, the scan leaves to it.
"""

from __future__ import annotations

import array
import json
import random
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from ckptdiff.dtypes import _BY_SAFETENSORS
from ckptdiff.errors import CkptError
from ckptdiff.formats import safetensors_format as st
from fmt_helpers import raw_safetensors, write_safetensors


def _file(header: str, data: bytes) -> bytes:
    raw = header.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> str:
    return json.dumps({"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
                       "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets})


HEADERS = [
    "{" + '"a":' + _entry() + "}",
    "{" + '"a":' + _entry() + ',"b":' + _entry(offsets=(8, 16)) + "}",
    "{" + '"a":' + _entry() + ',"a":' + _entry() + "}",                       # duplicate name
    "{" + '"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}' + "}",  # duplicate key in an entry
    '{"__metadata__":{"k":"a:b","k":"c"},"a":' + _entry() + "}",           # duplicate metadata key, colon in a value
    '{"__metadata__":{"t":"12:30"},"a":' + _entry() + "}",                 # a colon in a value, no duplicate
    "{" + '"a:b":' + _entry() + "}",                                          # a colon in a name
    "{" + '"a":' + _entry(shape=(0, 2), offsets=(0, 0)) + ',"b":' + _entry() + "}",  # a zero dim
    "{" + '"a":' + _entry(shape=[True, 2]) + "}",                             # a bool dim
    "{" + '"a":' + _entry(offsets=[False, 8]) + "}",                          # a bool offset
    "{" + '"a":' + _entry(shape=(2 ** 62, 2 ** 62, 0), offsets=(0, 0)) + ',"b":' + _entry() + "}",  # u64 overflow
    "{" + '"a":' + _entry(shape=(3,)) + "}",                                  # size mismatch
    "{" + '"a":' + _entry(offsets=(0, 16)) + "}",                             # past the end
    "{" + '"a":' + _entry(dtype="X9") + "}",                                  # unknown dtype
    "{" + '"a":' + _entry(shape=(), offsets=(0, 4)) + ',"b":' + _entry(shape=(1,), offsets=(4, 8)) + "}",  # scalars
    "{" + '"a\\ud800":' + _entry() + "}",                                     # lone surrogate escape
    "{" + '"a\\u00e9":' + _entry() + "}",                                     # a plain escape
    "{" + '"a":' + _entry(shape="2") + "}",                                   # shape not a list
    "{" + '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":{"x":1}}' + "}",  # nested extra member
]


def _outcome(data: bytes):
    try:
        return st._parse(data, "t.safetensors")
    except CkptError as e:
        return ("error", str(e))


@pytest.mark.parametrize("header", HEADERS)
def test_fast_path_and_full_checks_agree(header, monkeypatch):
    data = _file(header, bytes(8))
    fast = _outcome(data)
    monkeypatch.setattr(st, "_MAX_NUMEL", 0)  # no dim fits: every entry takes the full checks
    monkeypatch.setattr(st, "_loads", lambda text: json.loads(text, object_pairs_hook=st._no_duplicates))
    assert fast == _outcome(data)


def test_duplicates_are_refused_and_colons_are_not_mistaken_for_them():
    assert "twice" in _outcome(_file(HEADERS[2], bytes(8)))[1]
    assert "twice" in _outcome(_file(HEADERS[4], bytes(8)))[1]
    tensors, metadata = _outcome(_file(HEADERS[5], bytes(8)))
    assert metadata == {"t": "12:30"} and list(tensors) == ["a"]


def test_a_common_entry_takes_the_fast_path(monkeypatch):
    def full_checks(*_args, **_kwargs):
        raise AssertionError("the full checks ran for a common entry")

    monkeypatch.setattr(st, "check_shape", full_checks)
    tensors, _ = _outcome(_file(HEADERS[1], bytes(16)))
    assert tensors["b"] == ("float32", (2,), 8 + len(HEADERS[1]) + 8, 8 + len(HEADERS[1]) + 16)



# ---- the C scan ------------------------------------------------------------------

try:
    from ckptdiff import _cheader
except ImportError:
    _cheader = None

needs_c = pytest.mark.skipif(_cheader is None, reason="the C module ckptdiff._cheader was not built")

DTYPES = {code: (dt.name, dt.itemsize) for code, dt in _BY_SAFETENSORS.items()}


class _Sized:
    """A file's bytes as _parse reads them, the data section zeros only counted (it may be petabytes)."""

    def __init__(self, head: bytes, data_len: int) -> None:
        self.head, self.size = head, len(head) + data_len

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        assert key.stop is not None and key.stop <= len(self.head)
        return self.head[key]


def _split(data: bytes | _Sized) -> tuple[bytes, int]:
    n = int.from_bytes(data[:8], "little")
    return data[8:8 + n], len(data) - 8 - n


def _scan_agrees(data: bytes | _Sized, hint: list[str] | None = None):
    """The scan of a file's header accepts only what _parse accepts, and reads the same; returns its answer."""
    header, data_len = _split(data)
    got = _cheader.scan(header, data_len, DTYPES, hint)
    try:
        expected = st._parse(data, "t.safetensors")
    except CkptError:
        assert got is None, header
        return None
    if got is None:
        return None
    names, dtype_names, shapes, begins, nbytes, span, same_as_hint = got
    n = len(names)
    assert type(names) is list and all(type(name) is str for name in names)
    assert len(dtype_names) == len(shapes) == n and len(begins) == len(nbytes) == 8 * n
    assert all(any(d is name for name, _ in DTYPES.values()) for d in dtype_names)  # the given objects
    assert all(type(shape) is tuple and all(type(d) is int for d in shape) for shape in shapes)
    start = 8 + len(header)
    rows = [(name, (dtype, shape, start + b, start + b + size)) for name, dtype, shape, b, size
            in zip(names, dtype_names, shapes, array.array("q", begins), array.array("q", nbytes))]
    tensors, metadata = expected
    assert rows == list(tensors.items())  # same tensors, in header order
    if span is None:
        assert metadata == {}
    else:
        value = json.loads(header[span[0]:span[1]])
        assert type(value) is dict and value == metadata
    assert same_as_hint is (hint is not None and len(hint) == n and all(a is b for a, b in zip(names, hint)))
    return got


def _with_data(header_bytes: bytes, data_len: int) -> _Sized:
    return _Sized(struct.pack("<Q", len(header_bytes)) + header_bytes, data_len)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

#: (header, data length): the bad headers of the reader tests, and more.
ODD_FILES = [(h.encode(), size) for h in HEADERS for size in (8, 16)] + [
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode(), 8),
    (json.dumps({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}).encode(), 8),
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}).encode(), 0),
    (json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode(), 16),
    (json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), 8),
    (json.dumps({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 0]}}).encode(), 0),
    (json.dumps({"w": {"dtype": "U8", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]}}).encode(), 0),
    (json.dumps({"w": {"dtype": "U8", "shape": [1 << 24, 1 << 24], "data_offsets": [0, 1 << 48]}}).encode(), 0),
    (json.dumps({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}).encode(), 0),
    (json.dumps({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 0]}}).encode(), 0),
    (json.dumps({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}).encode(), 16),
    (json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode(), 0),
    (b'{"w": ' + json.dumps(F32x2).encode() + b', "w": ' + json.dumps(F32x2).encode() + b"}", 8),
    (json.dumps({"__metadata__": {"a": 1}}).encode(), 0),
    (json.dumps({"w": {**F32x2, "data_offsets": [0, True]}}).encode(), 8),
    (b'{"w": {"dtype": "F32",', 8),
    (b'{"\xff": 1}', 0),
    (b'{"a": [1, 2]}', 0),
    (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}", 0),
    (b"{" + b'"a":[' * 1000 + b"]" * 1000 + b"}", 0),
    (b"[]", 0), (b"", 0), (b"   ", 0), (b"{}", 0), (b" {} ", 0), (b"{}", 8), (b"{} {}", 0), (b"{}x", 0),
    (b"\xef\xbb\xbf{}", 0),                                                      # a UTF-8 byte order mark
    (b'{"__metadata__":{"a":"b"}}', 0), (b'{"__metadata__":{}}', 0), (b'{"__metadata__":{}}', 4),
    (b'{"__metadata__":{"a":"b"},"__metadata__":{"c":"d"}}', 0),              # __metadata__ twice
    (b'{"__metadata__":{"a":"b","a":"c"}}', 0),                               # a metadata key twice
    (b'{"__metadata__":{"a":"b","\xc3\xa9":"\xc3\xa9"}}', 0),
    (b'{"__metadata__":{"a":"\xed\xa0\x80"}}', 0),                            # an encoded surrogate
    (b'{"__metadata__":{"a":"\xc0\xae"}}', 0),                                # an overlong encoding
    (b'{"__metadata__":{"a\xf4\x90\x80\x80":"b"}}', 0),                      # past U+10FFFF
    (b'{"__metadata__":{"a":"b\\u0041"}}', 0),
    (b'{"__metadata__":{"a":"b\x01"}}', 0),
    (b'{"__metadata__":{"a":["b"]}}', 0),
    (b'{"__metadata__":"x"}', 0),
    (b'{"__metadata__":' + json.dumps(F32x2).encode() + b"}", 8),              # a tensor of that name
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"dtype":"F32"}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"shape":[2],"data_offsets":[0,8],"dtype":"F32"}}', 8),
    (b'{"a":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[00,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2,],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[,2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\x00', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\x0b', 8),      # not JSON whitespace
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\xc2\xa0', 8),
    (b' \t\r\n{ "a" : { "dtype" : "F32" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 8 ] } } \n', 8),
    (b'{"a":{"dtype":"F32","shape":[1,1,1,2,1],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BOOL","shape":[],"data_offsets":[8,9]}}', 9),
    (b'{"b":{"dtype":"BOOL","shape":[],"data_offsets":[8,9]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 9),
    (b'{"b":{"dtype":"BOOL","shape":[],"data_offsets":[8,9]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 10),
    (b'{"b":{"dtype":"BOOL","shape":[],"data_offsets":[9,10]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 10),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', 16),
    (b'{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a:b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"\xc3\xa9":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"\xc3":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),        # truncated UTF-8
    (b'{"a\x1f":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a\x7f":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a\\"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F3\\u0032","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":32,"shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[281474976710656],"data_offsets":[0,1125899906842624]}}', 1 << 50),
    (b'{"a":{"dtype":"F32","shape":[281474976710657],"data_offsets":[0,1125899906842628]}}', 1 << 50),
    (b'{"a":{"dtype":"U8","shape":[65536,65536,65536],"data_offsets":[0,281474976710656]}}', 1 << 48),
    (b'{"a":{"dtype":"U8","shape":[65536,65536,65537],"data_offsets":[0,281479271677952]}}', 1 << 48),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[999999999999999999,1000000000000000000]}}', 0),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,0]}}', 0),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[9223372036854775807,9223372036854775808]}}', 0),
    (b'{"a":{"dtype":"U8","shape":[' + b"1," * 70 + b'1],"data_offsets":[0,1]}}', 1),
    (b'{"a":{"dtype":"U8","shape":[' + b"1," * 62 + b'1],"data_offsets":[0,1]}}', 1),
]


@needs_c
@pytest.mark.parametrize(("header", "data_len"), ODD_FILES)
def test_scan_accepts_only_what_the_parser_accepts(header, data_len):
    _scan_agrees(_with_data(header, data_len))


#: Valid headers the scan leaves to the parser: escapes, extra keys, empty tensors,
#: "-0", a tensor named __metadata__, more than 64 dims, 19-digit offsets.
LEFT_TO_THE_PARSER = [
    (b'{"a\\u00e9":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"__metadata__":{"a":"b\\n"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}}', 8),
    (b'{"a":{"dtype":"F32","shape":[0,2],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
     8),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', 8),
    (b'{"__metadata__":' + json.dumps(F32x2).encode() + b"}", 8),
    (b'{"a":{"dtype":"U8","shape":[' + b"1," * 64 + b'1],"data_offsets":[0,1]}}', 1),
]


@needs_c
@pytest.mark.parametrize(("header", "data_len"), LEFT_TO_THE_PARSER)
def test_scan_leaves_unusual_valid_headers_to_the_parser(header, data_len):
    data = _with_data(header, data_len)
    st._parse(data, "t.safetensors")  # valid
    assert _cheader.scan(header, data_len, DTYPES, None) is None


@needs_c
def test_scan_reads_files_the_safetensors_library_writes(tmp):
    rng = np.random.default_rng(0)
    arrays = {
        "model.embed.weight": rng.standard_normal((7, 3)).astype(np.float32),
        "scalar": np.array(2.5, dtype=np.float64),
        "half": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "ints": np.arange(5, dtype=np.int64), "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i16": np.arange(3, dtype=np.int16), "i8": np.arange(9, dtype=np.int8).reshape(3, 3),
        "u64": np.arange(2, dtype=np.uint64), "u32": np.arange(2, dtype=np.uint32),
        "u16": np.arange(1, dtype=np.uint16), "u8": np.arange(11, dtype=np.uint8),
        "mask": np.array([True, False, True]), "flag": np.array(True),
        "é.名前.😀": np.ones((1, 1, 1, 2), dtype=np.float32), "a:b c": np.zeros(1, dtype=np.int8),
    }
    for i, metadata in enumerate([None, {"format": "np"}, {"format": "pt", "ключ": "значение", "empty": ""}]):
        path = write_safetensors(tmp(f"lib{i}.safetensors"), arrays, metadata=metadata)
        data = open(path, "rb").read()
        got = _scan_agrees(data)
        assert got is not None and sorted(got[0]) == sorted(arrays)
        assert (got[5] is None) == (metadata is None)
        assert _scan_agrees(data, hint=list(got[0]))[6] is True
    path = write_safetensors(tmp("one.safetensors"), {"w": np.zeros(3, np.float32)})
    assert _scan_agrees(open(path, "rb").read()) is not None
    path = raw_safetensors(tmp("none.safetensors"), {})
    assert _scan_agrees(open(path, "rb").read())[0] == []


@needs_c
def test_scan_of_every_truncation_of_a_header():
    header = (b'{"__metadata__":{"format":"pt"},"a.\xc3\xa9":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              b' "b" : {"shape":[ ],"dtype":"I16","data_offsets":[8,10]}}')
    assert _scan_agrees(_with_data(header, 10)) is not None
    for cut in range(len(header)):
        for data_len in (0, 10):
            assert _cheader.scan(header[:cut], data_len, DTYPES, None) is None
            _scan_agrees(_with_data(header[:cut], data_len))


NAME_PARTS = ["model", "layers", "0", "12", "weight", "bias", "é", "名前", "😀", ":", " ", "x" * 9, "a", ""]
WHITESPACE = ["", "", "", " ", "\n", "\t", " \r\n  "]


def _generated(rnd: random.Random, mutate: bool) -> tuple[bytes, int]:
    """A random header of plain entries in random layout, key order and whitespace; optionally mutated."""
    def w() -> str:
        return rnd.choice(WHITESPACE)

    def obj(pairs: list[tuple[str, str]]) -> str:
        if not pairs:
            return "{" + w() + "}"
        return "{" + ",".join(w() + k + w() + ":" + w() + v + w() for k, v in pairs) + "}"

    def arr(items: list[str]) -> str:
        return "[" + w() + ",".join(w() + x + w() for x in items) + "]" if items else "[" + w() + "]"

    def text(s: str) -> str:
        return json.dumps(s, ensure_ascii=mutate and rnd.random() < 0.1)

    n = rnd.randrange(0, 6)
    entries = []
    for _ in range(n):
        name = ".".join(rnd.choice(NAME_PARTS) for _ in range(rnd.randrange(1, 4)))
        code = rnd.choice(list(DTYPES))
        shape = [rnd.choice([1, 2, 3, 5, 7]) for _ in range(rnd.randrange(0, 4))]
        size = DTYPES[code][1] * int(np.prod(shape, dtype=np.int64))
        entries.append({"name": name, "dtype": code, "shape": shape, "size": size})
    layout = list(range(n))
    rnd.shuffle(layout)
    pos = 0
    for i in layout:
        entries[i]["offsets"] = [pos, pos + entries[i]["size"]]
        pos += entries[i]["size"]
    data_len = pos
    if not mutate:  # names must be unique for the header to be valid
        seen: set[str] = set()
        for e in entries:
            while e["name"] in seen:
                e["name"] += "_"
            seen.add(e["name"])

    members: list[tuple[str, str]] = []
    for e in entries:
        fields = [(text("dtype"), text(e["dtype"])), (text("shape"), arr([str(d) for d in e["shape"]])),
                  (text("data_offsets"), arr([str(o) for o in e["offsets"]]))]
        rnd.shuffle(fields)
        members.append((text(e["name"]), obj(fields)))
    if rnd.random() < 0.4:
        meta = [(text(rnd.choice(NAME_PARTS) + str(i)), text(rnd.choice(NAME_PARTS))) for i in range(rnd.randrange(3))]
        members.insert(rnd.randrange(len(members) + 1), (text("__metadata__"), obj(meta)))

    if mutate:
        for _ in range(rnd.randrange(1, 3)):
            members, data_len = _mutation(rnd, members, data_len)
    header = w() + obj(members) + w()
    raw = header.encode("utf-8")
    if mutate and rnd.random() < 0.2:  # one byte changed
        i = rnd.randrange(len(raw))
        raw = raw[:i] + bytes([rnd.randrange(256)]) + raw[i + 1:]
    return raw, data_len


NUMBER_FORMS = ["0{}", "-{}", "{}.0", "{}e0", "{}0000000000000000000", "-0", "281474976710657", "1e2", "true",
                "null", '"{}"', "{}.", "0x{}", "+{}", "18446744073709551616", "9223372036854775807"]
ODD_STRINGS = ['"a\\u0041"', '"\\ud800"', '"a\\"b"', '"\\n"', '"\x01"', '"\x7f"', '"F32"', '"BF16"', '"F128"', '"f32"']


def _mutation(rnd: random.Random, members: list[tuple[str, str]], data_len: int) -> tuple[list[tuple[str, str]], int]:
    kind = rnd.randrange(12)
    members = list(members)
    if kind == 0 or not members:
        return members, max(0, data_len + rnd.choice([-2, -1, 1, 4]))
    i = rnd.randrange(len(members))
    name, value = members[i]
    if kind == 1:  # a number written another way
        numbers = [(m.start(), m.end()) for m in re.finditer(r"\d+", value)]
        if numbers:
            a, b = rnd.choice(numbers)
            value = value[:a] + rnd.choice(NUMBER_FORMS).format(value[a:b]) + value[b:]
    elif kind == 2:  # a string token replaced
        strings = [(m.start(), m.end()) for m in re.finditer(r'"[^"]*"', value)]
        if strings:
            a, b = rnd.choice(strings)
            value = value[:a] + rnd.choice(ODD_STRINGS) + value[b:]
    elif kind == 3:  # a member twice
        members.insert(rnd.randrange(len(members) + 1), members[i])
    elif kind == 4:  # an extra or repeated key inside the entry
        extra = rnd.choice(['"extra":1', '"dtype":"F32"', '"shape":[1]', '"data_offsets":[0,4]', '"x":{"y":[]}'])
        value = value[:-1] + ("," if len(value) > 2 else "") + extra + "}" if value.endswith("}") else value
    elif kind == 5:  # offsets swapped with another entry's
        j = rnd.randrange(len(members))
        other = re.findall(r'"data_offsets"\s*:\s*(\[[^\]]*\])', members[j][1])
        mine = re.findall(r'"data_offsets"\s*:\s*(\[[^\]]*\])', value)
        if other and mine:
            value = value.replace(mine[0], other[0], 1)
    elif kind == 6:  # a key removed
        value = re.sub(r'"(dtype|shape|data_offsets)"\s*:\s*("[^"]*"|\[[^\]]*\])\s*,?', "", value, count=1)
    elif kind == 7:  # the name duplicated from another entry
        name = members[rnd.randrange(len(members))][0]
    elif kind == 8:  # the value made something else
        value = rnd.choice(["[]", "{}", '"x"', "1", "null", "[1,2]", '{"a":"b"}', '{"a":1}'])
    elif kind == 9:  # trailing garbage or a comma
        value = value + rnd.choice([",", "}", "]", " x", "\x00"])
    elif kind == 10:  # a dim of 0 or a huge dim
        value = re.sub(r'("shape"\s*:\s*\[)', r"\g<1>" + rnd.choice(["0,", "281474976710656,", "1,"]),
                                     value, count=1)
    else:  # the name made __metadata__
        name = '"__metadata__"'
    members[i] = (name, value)
    return members, data_len


@needs_c
def test_scan_accepts_every_plain_generated_header():
    for seed in range(300):
        raw, data_len = _generated(random.Random(seed), mutate=False)
        got = _scan_agrees(_with_data(raw, data_len))
        assert got is not None, raw


@needs_c
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.randoms(use_true_random=False), hs.booleans())
def test_scan_agrees_with_the_parser_on_generated_headers(rnd, mutate):
    raw, data_len = _generated(rnd, mutate)
    _scan_agrees(_with_data(raw, data_len))


@needs_c
@settings(max_examples=400, deadline=None)
@given(hs.binary(max_size=200), hs.integers(0, 64))
def test_scan_never_fails_on_random_bytes(raw, data_len):
    assert _cheader.scan(raw, data_len, DTYPES, None) is None or raw.lstrip().startswith(b"{")
    _scan_agrees(_with_data(raw, data_len))


@needs_c
@settings(max_examples=300, deadline=None)
@given(hs.integers(0, 10 ** 6), hs.binary(min_size=1, max_size=4), hs.integers(0, 3))
def test_scan_of_a_valid_header_with_bytes_replaced(position, replacement, drop):
    header = (b'{"__metadata__":{"format":"pt"},"w.0":{"dtype":"F16","shape":[2,2],"data_offsets":[8,16]},'
              b'"w.1":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    i = position % len(header)
    mutant = header[:i] + replacement + header[i + drop:]
    _scan_agrees(_with_data(mutant, 16))


def _uniform(count: int, shape: list[int] | None = None) -> tuple[bytes, int]:
    shape = [4] if shape is None else shape
    size = 4 * int(np.prod(shape, dtype=np.int64))
    header = {f"model.layers.{i // 256}.experts.{i % 256}.weight":
              {"dtype": "F32", "shape": shape, "data_offsets": [size * i, size * (i + 1)]} for i in range(count)}
    return json.dumps(header).encode(), size * count


@needs_c
def test_scan_shares_the_hints_names_and_says_when_all_match():
    raw, data_len = _uniform(300)
    first = _cheader.scan(raw, data_len, DTYPES, None)
    names = first[0]
    assert first[6] is False
    second = _scan_agrees(_with_data(raw, data_len), hint=names)
    assert second[6] is True and all(a is b for a, b in zip(second[0], names))
    # a longer or shorter hint shares what it can, and says the names differ
    for hint in (names + ["extra"], names[:-1], names[:10]):
        got = _scan_agrees(_with_data(raw, data_len), hint=hint)
        assert got[6] is False and got[0] == names
        assert all(got[0][i] is hint[i] for i in range(min(len(hint), len(names))))
    # a different name, a str subclass, a non-str, and an equal str of another object
    hint = list(names)
    hint[5] = "other"
    hint[6] = type("S", (str,), {})(names[6])
    hint[7] = 7
    hint[8] = "".join(list(names[8]))
    got = _scan_agrees(_with_data(raw, data_len), hint=hint)
    assert got[6] is False and got[0] == names
    assert got[0][5] is not hint[5] and got[0][6] is not hint[6] and got[0][8] is hint[8]
    assert got[0][4] is hint[4] and got[0][9] is hint[9]
    assert _scan_agrees(_with_data(raw, data_len), hint=[])[6] is False


@needs_c
def test_scan_shares_non_ascii_names_with_the_hint():
    header = json.dumps({"é.0": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "名前": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, ensure_ascii=False).encode()
    first = _scan_agrees(_with_data(header, 2))
    hint = ["".join(list(n)) for n in first[0]]  # equal strings, other objects
    got = _scan_agrees(_with_data(header, 2), hint=hint)
    assert got[6] is True and got[0][0] is hint[0] and got[0][1] is hint[1]
    assert _scan_agrees(_with_data(header, 2), hint=["é.0", "名"])[6] is False


@needs_c
def test_scan_shares_equal_shape_tuples():
    raw, data_len = _uniform(1000, [3, 5])
    shapes = _cheader.scan(raw, data_len, DTYPES, None)[2]
    assert shapes[0] == (3, 5) and len({id(s) for s in shapes}) == 1
    entries, pos = {}, 0
    for i in range(600):  # shapes recurring in a pattern, as the layers of a model
        shape = [[2], [3, 2], [1], [2, 2, 1]][i % 4]
        size = 4 * int(np.prod(shape))
        entries[f"t{i}"] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    shapes = _scan_agrees(_with_data(json.dumps(entries).encode(), pos))[2]
    assert len({id(s) for s in shapes}) == 4


@needs_c
def test_scan_refuses_a_name_twice_among_many():
    raw, data_len = _uniform(2000)
    header = json.loads(raw)
    names = list(header)
    header["extra"] = {"dtype": "F32", "shape": [4], "data_offsets": [data_len, data_len + 16]}
    assert _scan_agrees(_with_data(json.dumps(header).encode(), data_len + 16)) is not None
    for twice in (names[3], names[-1], "extra"):
        text = json.dumps(header).replace('"extra"', f'"{twice}"').replace(f'"{names[0]}"', '"extra"')
        assert _scan_agrees(_with_data(text.encode(), data_len + 16)) is None


@needs_c
@pytest.mark.parametrize("pattern", ["t{}", "{}", "{:040d}", "layer.{}.w", "é{}"])
def test_scan_tells_many_similar_names_apart(pattern):
    count = 50_000
    header = {pattern.format(i): {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)}
    raw = json.dumps(header, ensure_ascii=False).encode()
    got = _cheader.scan(raw, count, DTYPES, None)
    assert got is not None and got[0] == list(header)
    last, middle = (json.dumps(pattern.format(i), ensure_ascii=False).encode() + b":" for i in (count - 1, count // 2))
    twice = raw.replace(last, middle)
    assert len(twice) == len(raw) - len(last) + len(middle)
    assert _cheader.scan(twice, count, DTYPES, None) is None


@needs_c
def test_scan_answers_wrong_arguments_with_type_errors():
    raw, data_len = _uniform(2)
    with pytest.raises(TypeError):
        _cheader.scan("{}", 0, DTYPES, None)
    with pytest.raises(TypeError):
        _cheader.scan(raw, data_len, list(DTYPES), None)
    with pytest.raises(TypeError):
        _cheader.scan(raw, data_len, {"F32": "float32"}, None)
    with pytest.raises(TypeError):
        _cheader.scan(raw, data_len, DTYPES, ("a", "b"))
    with pytest.raises(ValueError):
        _cheader.scan(raw, data_len, {"F32": ("float32", 0)}, None)
    assert _cheader.scan(raw, -1, DTYPES, None) is None
    assert _cheader.scan(raw, data_len, {}, None) is None
    assert _cheader.scan(memoryview(raw), data_len, DTYPES, None) is not None
    assert _cheader.scan(bytearray(raw), data_len, DTYPES, None) is not None


def test_scan_columns_is_none_without_the_c_module(monkeypatch):
    raw, data_len = _uniform(3)
    monkeypatch.setattr(st, "_cheader", None)
    assert st.scan_columns(raw, data_len) is None


@needs_c
def test_scan_columns_reads_the_header_with_the_canonical_dtypes():
    raw, data_len = _uniform(3)
    names, dtype_names, shapes, begins, nbytes, span, same = st.scan_columns(raw, data_len)
    assert dtype_names == ["float32"] * 3 and shapes == [(4,)] * 3 and span is None and same is False
    assert list(array.array("q", begins)) == [0, 16, 32] and list(array.array("q", nbytes)) == [16] * 3
    assert st.scan_columns(raw, data_len, names)[6] is True
    assert st.scan_columns(raw, data_len + 1) is None
