"""Bad input end to end through the real CLI: ``ckptdiff diff A B`` answers
exit 2 and exactly one line on stderr, ``ckptdiff: error: PATH: problem``,
with no traceback (and for hostile pickles, no code run)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fmt_helpers import raw_safetensors, write_safetensors, write_sharded

pytest.importorskip("ckptdiff.commands.diff")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _missing(d):
    return os.path.join(d, "missing.safetensors"), "no such file or directory"


def _empty(d):
    p = os.path.join(d, "empty.safetensors")
    open(p, "wb").close()
    return p, "file is empty"


def _truncated(d):
    p = write_safetensors(os.path.join(d, "t.safetensors"), {"w": np.arange(64, dtype=np.float32)})
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-32])
    return p, "run past the end of the data section"


def _absurd(d):
    return raw_safetensors(os.path.join(d, "a.safetensors"), b'{"w": 1}', length=1 << 62), "100,000,000-byte limit"


def _overflow(d):
    hdr = {"w": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 0]}}
    return raw_safetensors(os.path.join(d, "o.safetensors"), hdr), "absurdly large"


def _unknown(d):
    p = os.path.join(d, "weights.bin")
    open(p, "w").write("not a checkpoint at all\n")
    return p, "unknown format"


def _directory(d):
    p = os.path.join(d, "somedir")
    os.mkdir(p)
    return p, "is a directory"


def _loop(d):
    os.symlink(os.path.join(d, "l2"), os.path.join(d, "l1"))
    os.symlink(os.path.join(d, "l1"), os.path.join(d, "l2"))
    return os.path.join(d, "l1"), "symbolic links"


def _pickle(d):
    p = os.path.join(d, "evil.pt")
    with open(p, "wb") as f:
        pickle.dump({"w": _Payload(os.path.join(d, "PWNED"))}, f, protocol=2)
    return p, "never runs code"


def _torch_zip_pickle(d):
    import torch
    p = os.path.join(d, "evil_zip.pt")
    torch.save({"w": torch.ones(2), "x": _Payload(os.path.join(d, "PWNED"))}, p)
    return p, "never runs code"


def _npy_object(d):
    p = os.path.join(d, "obj.npy")
    np.save(p, np.array([_Payload(os.path.join(d, "PWNED"))], dtype=object), allow_pickle=True)
    return p, "object dtype"


def _shard_outside(d):
    s = write_sharded(os.path.join(d, "sharded"), {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)})
    idx = os.path.join(s, "model.safetensors.index.json")
    index = json.load(open(idx))
    index["weight_map"]["a"] = "../../etc/passwd"
    json.dump(index, open(idx, "w"))
    return s, "points outside the directory"


def _shard_missing(d):
    s = write_sharded(os.path.join(d, "sharded2"), {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)})
    os.remove(os.path.join(s, "model-00001-of-00002.safetensors"))
    return s, "is missing"


CASES = [_missing, _empty, _truncated, _absurd, _overflow, _unknown, _directory, _loop, _pickle,
         _torch_zip_pickle, _npy_object, _shard_outside, _shard_missing]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    d = str(tmp_path)
    good = write_safetensors(os.path.join(d, "good.safetensors"), {"w": np.ones(2, np.float32)})
    bad, problem = case(d)
    for args in ([bad, good], [good, bad]):
        proc = subprocess.run([sys.executable, "-m", "ckptdiff.cli", "diff", *args],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NO_COLOR": "1", "CKPTDIFF_DEBUG": ""})
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("ckptdiff: error: "), lines[0]
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        assert problem in lines[0], lines[0]
        assert os.path.basename(bad.rstrip("/")) in lines[0] or "sharded" in lines[0], lines[0]
    assert not os.path.exists(os.path.join(d, "PWNED")), "the payload ran"
