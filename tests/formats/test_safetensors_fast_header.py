"""The safetensors header's fast entry path decides exactly as the full checks do.

Common entries are accepted in a few type tests and duplicate keys are ruled
out by counting; anything unusual must reach the full checks. Each header
here is parsed twice, once as shipped and once with the fast path switched
off, and must give the same tensors or the same one-line error.
"""

from __future__ import annotations

import json
import struct

import pytest

from ckptdiff.errors import CkptError
from ckptdiff.formats import safetensors_format as st


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
