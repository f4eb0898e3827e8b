"""The lifecycle the framework callbacks share: manifest= resolution, metric filtering, option conflicts."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptdiff.hook import TrackerError  # noqa: E402
from ckptdiff.integrations._run import TrackedRun, scalar_metrics, trainable_names  # noqa: E402
from ckptdiff.manifest import Manifest  # noqa: E402

nn = torch.nn


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))


def test_manifest_is_resolved_with_its_own_precedence_against_the_parameter_names():
    assert trainable_names(Manifest(trainable=("2.*",)), model()) == ["2.weight", "2.bias"]  # the rest: frozen
    m = Manifest(trainable=("*",), frozen=("2.bias", "1.*"))  # an exact name, then the more specific glob win
    assert trainable_names(m, model()) == ["0.weight", "0.bias", "2.weight"]


def test_where_the_manifest_says_nothing_requires_grad_decides():
    net = model()
    net[1].requires_grad_(False)
    assert trainable_names(Manifest(frozen=("0.*",)), net) == ["2.weight", "2.bias"]
    assert trainable_names(Manifest(trainable=("0.weight",), frozen=("2.*",)), net) == ["0.weight", "0.bias"]


def test_manifest_file_and_patterns(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"trainable": ["2.*"]}))
    assert trainable_names(str(path), model()) == ["2.weight", "2.bias"]
    assert trainable_names(path, model()) == ["2.weight", "2.bias"]
    assert trainable_names("head.*", model()) == "head.*"  # a pattern, checked by the hook itself
    assert trainable_names(("a", "b"), model()) == ["a", "b"]
    assert trainable_names(None, model()) is None


def test_a_manifest_that_freezes_everything_is_refused():
    with pytest.raises(TrackerError, match="every parameter of the model frozen"):
        trainable_names(Manifest(trainable=("head.*",)), model())


def test_only_scalars_become_metrics():
    logs = {"loss": 0.5, "step": 3, "flag": True, "name": "x", "t": torch.tensor(2.0), "n": np.float32(1.5),
            "vector": torch.ones(3), "list": [1, 2], "none": None, "nested": {"a": 1}, 7: 1.0}
    assert sorted(scalar_metrics(logs)) == ["flag", "loss", "n", "name", "step", "t"]


def test_manifest_and_trainable_together_are_refused():
    with pytest.raises(TypeError, match="either manifest= or trainable="):
        TrackedRun("runs", 10, ["a.*"], "warn", {"trainable": ["b.*"]})
