"""``ckptdiff log --causes``: why each drifted tensor moved, from the shipped sample history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptdiff.cli import main

HISTORY = str(Path(__file__).resolve().parents[2] / "sample_ckpts" / "history")


def test_log_causes_table_says_why_once_per_tensor(capsys):
    assert main(["log", HISTORY, "--causes"]) == 0
    out = capsys.readouterr().out
    why = [line for line in out.splitlines() if "drifted" not in line and ": weight decay" in line]
    # encoder.0.* decay from snapshot #5 on: said once each, at the first snapshot where it shows
    assert len(why) == 2
    assert all("frozen parameters are still in an optimizer with weight_decay > 0" in line for line in why)
    assert {line.split()[1].rstrip(":") for line in why} == {"encoder.0.weight", "encoder.0.bias"}


def test_log_causes_json_grows_with_the_decay(capsys):
    assert main(["log", HISTORY, "--causes", "--format", "json"]) == 0
    snaps = json.loads(capsys.readouterr().out)["snapshots"]
    assert all(s["drift_causes"] == {} for s in snaps[:5])
    cs = [s["drift_causes"]["encoder.0.weight"]["cause_detail"]["c"] for s in snaps[5:]]
    assert all(s["drift_causes"]["encoder.0.weight"]["cause"] == "weight_decay" for s in snaps[5:])
    assert cs == sorted(cs) and cs[-1] == pytest.approx(0.0025, rel=0.01)  # decay accumulates


def test_plain_log_has_no_cause_fields(capsys):
    assert main(["log", HISTORY, "--format", "json"]) == 0
    assert "drift_causes" not in json.loads(capsys.readouterr().out)["snapshots"][-1]
