"""The training-hook example in docs/hook.md runs as written and does what the text says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

DOC = Path(__file__).resolve().parents[2] / "docs" / "hook.md"
SECTION = "## Quick start"


def _first_python_block(text: str) -> str:
    start = text.find(SECTION)
    assert start >= 0, f"docs/hook.md has no {SECTION!r} section"
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, "no ```python block in the quick start of docs/hook.md"
    return m.group(1)


def test_quick_start_example_runs_as_written(tmp_path):
    code = _first_python_block(DOC.read_text())
    (tmp_path / "example.py").write_text(code)
    env = dict(os.environ, PYTHONWARNINGS="default", OMP_NUM_THREADS="1")  # tiny model, shared cores
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # The text promises: a drift warning the step the frozen BatchNorm is left in train mode, nothing else.
    assert "DriftWarning" in proc.stderr and "moved at step 151" in proc.stderr
    assert "AuditWarning" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(" ")[0] for ln in lines] == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert all("moved at step 151" in ln for ln in lines)
    from ckptdiff.store import Store

    infos = Store.open(str(tmp_path / "runs" / "exp1")).list()
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (100, None), (151, "drift"), (200, None),
                                                (300, None)]
    # `ckptdiff log` finds them.
    log = subprocess.run([sys.executable, "-m", "ckptdiff.cli", "log", "runs/exp1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert log.returncode == 0, log.stderr
    assert "baseline" in log.stdout and "drift" in log.stdout
