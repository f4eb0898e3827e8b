"""Fixtures for the hook tests; the models and loops live in hook_helpers."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from hook_helpers import Net, make_data  # noqa: E402


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "runs" / "exp1")


@pytest.fixture
def no_warnings():
    """Fail on any warning from the hook (a clean run must be silent)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core box: intra-op threads only spin against each other (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
