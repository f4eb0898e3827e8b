"""The fast indented JSON writer: exactly what ``json.dumps(indent=2)`` writes.

It is speed work for reports of many small tensors that must not change a
byte of output: checked against ``json.dumps`` itself on generated values and
on a real 300-tensor report.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdiff import Checkpoint
from ckptdiff import diff
from ckptdiff.render import dumps_indent2, render, render_json


json_scalars = (st.none() | st.booleans() | st.integers() | st.text()
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fast_json_writes_exactly_what_json_dumps_writes(value):
    assert dumps_indent2(value) == json.dumps(value, indent=2, allow_nan=False)


@pytest.mark.parametrize("value", [
    {"x": float("nan")}, [1, float("inf")], {1: "int key"}, {"a": np.float32(1.5)},
    {"a": (1, {2: 3})}, {"s": {1, 2}},
])
def test_fast_json_declines_what_only_json_may_decide(value):
    assert dumps_indent2(value) is None


def test_fast_json_declines_deep_nesting_instead_of_crashing():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert dumps_indent2(deep) is None


def test_tuples_and_odd_strings_match_json():
    value = {"t": (1, 2.5, "x"), "e": [], "d": {}, "odd": "é\u2028\x00\"\\/\U0001f600", "b": [True, False, None]}
    assert dumps_indent2(value) == json.dumps(value, indent=2, allow_nan=False)


def test_rendered_json_is_byte_identical_to_the_report_to_json(many_small):
    a, b = many_small(300, 1)
    rep = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b))
    text = render_json(rep)
    assert text == rep.to_json() + "\n"
    data = json.loads(text)
    assert data["summary"]["removed"] == 1 and data["summary"]["added"] == 1
    assert data["summary"]["shape_changed"] == 1
    nan_rows = [t for t in data["tensors"] if t["nan_new"]]
    assert len(nan_rows) == 6 and all(t["nan_new"] == 1 for t in nan_rows)
    # rel_l2 of a +1e-3 shift against numpy float64.
    k = "block.7.w"
    d = b[k].astype(np.float64) - a[k].astype(np.float64)
    row = next(t for t in data["tensors"] if t["name"] == k)
    assert math.isclose(row["rel_l2"], np.linalg.norm(d) / np.linalg.norm(a[k].astype(np.float64)), rel_tol=1e-12)


def test_render_json_falls_back_to_json_for_non_finite_numbers(many_small):
    a, b = many_small(12, 2)
    rep = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b))
    rep.atol = float("nan")  # not something the engine makes; json must refuse it, as before
    with pytest.raises(ValueError):
        render_json(rep)


def test_json_cli_output_equals_to_json(many_small, tmp_path):
    from safetensors.numpy import save_file

    a, b = many_small(50, 4)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    rep = diff(pa, pb)
    for show_all in (True, False):
        buf = io.StringIO()
        render(rep, "json", buf, show_all=show_all)
        assert buf.getvalue() == rep.to_json(identical=show_all) + "\n"
