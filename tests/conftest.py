"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def unprivileged() -> list[str]:
    """A command prefix under which file modes bind: empty for a normal user; as
    root, ``setpriv`` dropping the capabilities that bypass them (dac_override,
    dac_read_search, fowner). Skips the test when root has no ``setpriv``."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make file modes bind")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


@pytest.fixture(params=["c", "numpy"])
def stats_backend(request, monkeypatch) -> str:
    """Run a statistics test once per implementation: the C module, then numpy."""
    from ckptdiff import stats

    if request.param == "c" and stats.backend() != "c":
        pytest.skip("the C statistics module is not in use (not built, or CKPTDIFF_STATS=numpy)")
    if request.param == "numpy":
        monkeypatch.setattr(stats, "_C_KIND", {})
    return request.param
