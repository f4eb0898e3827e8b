"""Fixtures for the CLI tests: small real safetensors files, some with hostile names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import HOSTILE
from safetensors.numpy import save_file


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    a = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in HOSTILE}
    b = {n: v.copy() for n, v in a.items()}
    for v in b.values():
        v[0, 0] += np.float32(0.5)
    out = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors",
           "x": tmp_path / "x.safetensors", "y": tmp_path / "y.safetensors",
           "empty": tmp_path / "empty.safetensors", "empty_npz": tmp_path / "empty.npz",
           "man": tmp_path / "man.json"}
    save_file(a, str(out["a"]))
    save_file(b, str(out["b"]))
    save_file({"x": np.arange(3, dtype=np.float32)}, str(out["x"]))
    save_file({"y": np.arange(3, dtype=np.float32)}, str(out["y"]))
    save_file({}, str(out["empty"]))
    np.savez(out["empty_npz"])
    out["man"].write_text(json.dumps({"trainable": ["nothing"]}))
    return out

