"""Fixtures for the snapshot store tests: generated tensors of every dtype and fresh stores."""

from __future__ import annotations

import os

import pytest

from ckptdiff.store import Store


@pytest.fixture(params=[False, True], ids=["raw", "zstd"])
def store(request, tmp_path) -> Store:
    """A fresh store, once uncompressed and once compressed."""
    s = Store.init(tmp_path / "store", compress=request.param)
    yield s
    s.close()


@pytest.fixture
def raw_store(tmp_path) -> Store:
    s = Store.init(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def store_dir(tmp_path) -> str:
    return os.fspath(tmp_path / "store")
