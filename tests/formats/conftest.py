"""Fixtures for the format reader tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


@pytest.fixture
def tmp(tmp_path) -> Callable[[str], str]:
    """``tmp("x.pt")`` -> a path string inside this test's tmp_path."""
    return lambda name: os.fspath(tmp_path / name)
