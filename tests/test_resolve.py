"""Resolution: files, sharded directories and their index, DIR@REF snapshots, and the errors in between."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptdiff import Checkpoint, CkptError, resolve
from ckptdiff.formats import open_checkpoint as open_file
from ckptdiff.store import Store


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": np.arange(3, dtype=np.float32)}, str(d / "s1.safetensors"))
    save_file({"b": np.ones(2, np.int64)}, str(d / "s2.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return d


def test_a_sharded_directory_and_its_index_file_open_alike(sharded):
    with resolve.open_checkpoint(sharded) as by_dir, \
            resolve.open_checkpoint(sharded / "model.safetensors.index.json") as by_index:
        assert by_dir.format == by_index.format == "safetensors-sharded"
        assert sorted(by_index) == ["a", "b"]
        np.testing.assert_array_equal(by_index["a"].numpy(), np.arange(3, dtype=np.float32))


def test_store_refs_resolve_here_and_not_in_formats(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"w": np.ones(4, np.float32)}, str(f))
    root = tmp_path / "runs"
    with Store.init(root) as st, resolve.open_checkpoint(f) as ck:
        st.snapshot(ck, step=3, tag="base")
    with resolve.open_checkpoint(f"{root}@base") as snap:
        assert snap.format == "store" and list(snap) == ["w"]
    with pytest.raises(CkptError, match="no such file"):
        open_file(f"{root}@base")  # the readers know files only
    with pytest.raises(CkptError, match=r"is a ckptdiff store: name a snapshot as DIR@REF"):
        resolve.open_checkpoint(root)
    with pytest.raises(CkptError, match="nothing after '@'"):
        resolve.open_checkpoint(f"{root}@")
    with pytest.raises(CkptError, match="is not a ckptdiff store"):
        resolve.open_checkpoint(f"{tmp_path}@latest")


def test_opened_closes_only_what_it_opened(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"w": np.ones(4, np.float32)}, str(f))
    mine = Checkpoint.from_arrays({"w": np.zeros(4, np.float32)})
    closed: list[str] = []
    mine.on_close(lambda: closed.append("mine"))
    with resolve.opened(mine, f) as (a, b):
        assert a is mine and b.format == "safetensors"
        b.on_close(lambda: closed.append("file"))
    assert closed == ["file"]
    with pytest.raises(TypeError, match="a path, a DIR@REF string or a Checkpoint"):
        with resolve.opened(42):
            pass


def test_manifest_arguments_become_manifests(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{"trainable": ["head.*"]}')
    assert resolve.load_manifest(None) is None
    assert resolve.load_manifest(p).role("body") == "frozen"
    assert resolve.load_manifest({"frozen": ["x"]}).source == "<dict>"
    with pytest.raises(TypeError):
        resolve.load_manifest(3.5)
