"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import shutil

import numpy as np
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


@pytest.fixture
def many_small():  # type: ignore[no-untyped-def]
    """``many_small(n, seed)``: a model of ``n`` small float32 tensors and an edited copy (every 7th
    shifted, some NaNs, one tensor removed, one added, one reshaped)."""
    def pair(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        a = {f"block.{i}.{kind}": rng.standard_normal(int(rng.integers(1, 3000))).astype(dt)
             for i in range(n) for kind, dt in (("w", np.float32),)}
        b = {k: v.copy() for k, v in a.items()}
        for i, k in enumerate(a):
            if i % 7 == 0:
                b[k] = (b[k] + np.float32(1e-3)).astype(b[k].dtype)
            if i % 50 == 3:
                b[k][0] = np.nan
        del b["block.5.w"]
        b["extra\u00e9|`"] = np.arange(4, dtype=np.int16)
        b["block.9.w"] = b["block.9.w"][:-1].copy()
        return a, b

    return pair
