"""Fixtures for the framework-integration tests; store readers live in integ_helpers."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core box: intra-op threads only spin against each other (10x slower)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
