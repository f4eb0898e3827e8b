"""The C writer of JSON tensor rows (ckptdiff._crows) writes exactly what the Python writer writes.

``render._rows`` hands a batch of rows to ``_crows.encode_rows`` and keeps
the Python loop for anything it declines (None). Checked against the Python
path (``_crows`` switched off) and against ``json.dumps(t.to_dict(),
indent=2)`` itself: rows of real diffs (every status, every cause, NaN and
Inf, manifest roles, drift and stale), generated rows (odd strings, every
kind of float, big ints, tuple and empty shapes, each cause's details), and
values the C writer must decline rather than guess.
"""

from __future__ import annotations

import json
import math
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

_crows = pytest.importorskip("ckptdiff._crows")

from ckptdiff import engine, render, stats  # noqa: E402
from ckptdiff.manifest import Manifest  # noqa: E402
from ckptdiff.report import MergeCheck, TensorDiff, row_values  # noqa: E402
from ckptdiff.resolve import open_checkpoint  # noqa: E402

ROW_NL = "\n    "


def python_rows(rows: list[TensorDiff], first: bool) -> str:
    """render._rows without the C writer."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(render, "_crows", None)
        return render._rows(rows, first)


def dumps_rows(rows: list[TensorDiff], first: bool) -> str:
    """The rows as json.dumps writes them, moved to the depth of the report's tensor list."""
    return "".join(("" if first and i == 0 else ",") + ROW_NL
                   + json.dumps(t.to_dict(), indent=2, allow_nan=False).replace("\n", ROW_NL)
                   for i, t in enumerate(rows))


def c_rows(rows: list[TensorDiff], first: bool) -> str | None:
    return _crows.encode_rows([row_values(t) for t in rows], first)


def assert_same(rows: list[TensorDiff]) -> None:
    for first in (True, False):
        got = c_rows(rows, first)
        assert got is not None
        assert got == python_rows(rows, first) == dumps_rows(rows, first)
        assert render._rows(rows, first) == got


# ---------------------------------------------------------------------------
# rows of real diffs
# ---------------------------------------------------------------------------

ODD_NAME = "nan\"quote\\back\nline\ttab\x7fdel\x01\u00e9\u2028\U0001f600"


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    for i in range(40):
        t[f"layers.{i}.w"] = rng.standard_normal((8, 6)).astype(np.float32)
    for name in ("rounded", "decayed", "doubled", "reinit", "stepped"):
        t[name] = rng.standard_normal(64).astype(np.float32)
    t["bn.running_mean"] = rng.standard_normal(16).astype(np.float32)
    t["embed"] = rng.standard_normal((32, 8)).astype(np.float32)
    t["low.rank"] = rng.standard_normal((16, 12)).astype(np.float32)
    t["zeros"] = np.zeros(8, dtype=np.float32)
    t[ODD_NAME] = rng.standard_normal(9).astype(np.float32)
    t["inf"] = rng.standard_normal(9).astype(np.float32)
    t["overflow"] = np.array([-1e308, 1.0, 2.0], dtype=np.float64)
    t["half"] = rng.standard_normal(33).astype(np.float16)
    t["bf"] = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
    t["steps"] = np.arange(6, dtype=np.int64)
    t["scalar"] = np.array(1.5, dtype=np.float32)
    t["reshaped"] = np.ones((2, 6), dtype=np.float32)
    t["retyped"] = np.ones(4, dtype=np.float32)
    t["gone"] = np.zeros(3, dtype=np.float32)
    t["frozen.same"] = np.ones(5, dtype=np.float32)
    return t


def _tuned(a: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    b = {k: v.copy() for k, v in a.items()}
    for i in range(0, 40, 3):
        b[f"layers.{i}.w"] += rng.standard_normal((8, 6)).astype(np.float32) * np.float32(1e-3)
    b["rounded"] = b["rounded"].astype(ml_dtypes.bfloat16).astype(np.float32)
    b["decayed"] *= np.float32(0.99)
    b["doubled"] *= np.float32(2)
    b["reinit"] = rng.standard_normal(64).astype(np.float32)
    b["stepped"] += np.float32(1e-3) * np.sign(rng.standard_normal(64)).astype(np.float32)
    b["bn.running_mean"] += np.float32(0.1)
    b["embed"][[3, 7]] += np.float32(1)
    b["low.rank"] += np.outer(rng.standard_normal(16), rng.standard_normal(12)).astype(np.float32)
    b["zeros"][2] = 1  # rel_l2 inf
    b[ODD_NAME][1] = np.nan
    b["inf"][2] = np.inf
    b["overflow"][0] = 1e308  # |Δ| overflows to inf
    b["half"] += np.float16(0.5)
    b["steps"] += 1
    b["reshaped"] = np.ones((3, 4), dtype=np.float32)
    b["retyped"] = np.ones(4, dtype=np.float64)
    del b["gone"]
    b["new"] = rng.standard_normal(5).astype(np.float32)
    return b


MANIFEST = Manifest(trainable=["layers.1*", "scalar", "frozen.*"], frozen=["*"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("crows")
    rng = np.random.default_rng(7)
    a = _model(rng)
    b = _tuned(a, rng)
    pa, pb = str(d / "a.safetensors"), str(d / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    return pa, pb


def _diff(files, **kw):
    with open_checkpoint(files[0]) as a, open_checkpoint(files[1]) as b:
        return engine.diff(a, b, **kw)


@pytest.mark.parametrize("kw", [{}, {"manifest": MANIFEST}, {"manifest": MANIFEST, "atol": 1e-2, "rank": 2}],
                         ids=["plain", "manifest", "manifest-tolerance-rank"])
def test_rows_of_a_real_diff_are_byte_identical(files, kw):
    rep = _diff(files, **kw)
    rows = list(rep.tensors)
    statuses = {t.status for t in rows}
    assert statuses == {"identical", "changed", "added", "removed", "shape_changed", "dtype_changed"}
    assert any(isinstance(v, float) and not math.isfinite(v)
               for t in rows for v in (t.max_abs_delta, t.mean_abs_delta, t.rel_l2))
    assert any(t.cause == "sparse_rows" for t in rows)  # a list of ints in cause_detail
    if "manifest" in kw:
        assert any(t.drift for t in rows) and any(t.stale for t in rows)
    if "rank" in kw:
        assert any(t.cause == "low_rank" for t in rows)
    assert_same(rows)
    for t in rows:  # each row alone, as the first of the list and after another
        assert_same([t])


def test_rows_of_the_numpy_statistics_backend_are_byte_identical(files, monkeypatch):
    monkeypatch.setattr(stats, "_C_KIND", {})
    assert_same(list(_diff(files, manifest=MANIFEST).tensors))


def test_rendered_json_with_the_c_writer_equals_to_json(files):
    rep = _diff(files, manifest=MANIFEST)
    assert render._crows is _crows
    assert render.render_json(rep) == rep.to_json(identical=True) + "\n"
    assert render.render_json(rep, show_all=False) == rep.to_json(identical=False) + "\n"


def test_rendered_json_is_the_same_in_batches(files, monkeypatch):
    rep = _diff(files, manifest=MANIFEST)
    want = render.render_json(rep)
    monkeypatch.setattr(render, "_JSON_BATCH", 3)
    assert render.render_json(rep) == want
    monkeypatch.setattr(render, "_crows", None)
    assert render.render_json(rep) == want


# ---------------------------------------------------------------------------
# generated rows
# ---------------------------------------------------------------------------

ODD_STRINGS = ["", "\"", "\\", "\n\r\t\b\f", "\x00\x1f\x7f\x80\xff", "é", "\u2028\u2029", "\ud800", "\udfff",
               "\ud83d\ude00", "\U0001f600", "\U0010ffff", "%s%%", "a\"b\\c/d", ODD_NAME]
SPECIAL_FLOATS = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1e308,
                  1.7976931348623157e308, 1e16, 1e15, 9999999999999998.0, 1e-4, 1e-5, 0.0001234, 0.1, 1 / 3,
                  2.0**60, 2.0**53, 2.0**53 + 2, 123456789.0, 5e-5, 2.5e-5, 1e22, 1e23, 9.5367431640625e-07]

texts = st.text(st.characters(blacklist_categories=()), max_size=12) | st.sampled_from(ODD_STRINGS)
finite = (st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(SPECIAL_FLOATS)
          | st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0])
          .filter(math.isfinite))
any_float = finite | st.sampled_from([math.nan, math.inf, -math.inf, -math.nan])
ints = st.integers() | st.sampled_from([0, -1, 2**63 - 1, 2**63, -2**63 - 1, 2**64, 2**70, -2**70, 10**30])
#: What _sc writes: the type of a count field is not checked beyond being a JSON scalar.
scalars = st.none() | ints | finite | texts | st.booleans()
stats_values = st.none() | any_float | ints
shapes = st.none() | st.lists(ints, max_size=4) | st.lists(ints, max_size=4).map(tuple)
str_or_none = st.none() | texts
int_lists = st.lists(ints, max_size=6) | st.lists(ints, max_size=3).map(tuple)
detail_values = st.none() | st.booleans() | ints | any_float | texts | int_lists

#: The key sets cause.classify and cause.with_low_rank write.
CAUSE_KEYS = [("nan_new", "inf_new"), ("buffer", "rel_l2"), ("dtype", "max_abs_delta"), ("c", "cosine", "rel_l2"),
              ("rows", "of", "first"), ("cosine", "rel_l2", "new_norm_ratio"), ("typical_abs_delta", "uniformity"),
              ("typical_abs_delta", "uniformity", "decay_c", "decay_share"), ("rank", "energy", "max_rank"),
              ("cosine", "uniformity", "typical_abs_delta")]
details = (st.none() | st.just({})
           | st.sampled_from(CAUSE_KEYS).flatmap(
               lambda keys: st.tuples(*[detail_values] * len(keys)).map(lambda vs: dict(zip(keys, vs))))
           | st.dictionaries(texts, detail_values, max_size=4))


@st.composite
def tensor_diffs(draw) -> TensorDiff:
    return TensorDiff(
        name=draw(texts), status=draw(st.sampled_from(["changed", "identical", "added"]) | texts),
        role=draw(st.sampled_from(["trainable", "frozen", "buffer", "unknown"]) | texts),
        drift=draw(st.booleans()), stale=draw(st.booleans()), dtype_old=draw(str_or_none),
        dtype_new=draw(str_or_none), shape_old=draw(shapes), shape_new=draw(shapes), numel=draw(scalars),
        hash_old=draw(str_or_none), hash_new=draw(str_or_none), max_abs_delta=draw(stats_values),
        mean_abs_delta=draw(stats_values), rel_l2=draw(stats_values), changed_elements=draw(scalars),
        nan_new=draw(scalars), inf_new=draw(scalars), out_of_tolerance=draw(scalars), cause=draw(str_or_none),
        cause_detail=draw(details))


@settings(max_examples=400, deadline=None)
@given(st.lists(tensor_diffs(), min_size=1, max_size=5))
def test_generated_rows_are_byte_identical(rows):
    assert_same(rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, finite, any_float), min_size=1, max_size=20))
def test_floats_are_written_as_float_repr(values):
    rows = [TensorDiff("t", "changed", max_abs_delta=x, mean_abs_delta=y, rel_l2=z, changed_elements=1,
                       cause="dense_update", cause_detail={"cosine": x, "uniformity": z, "typical_abs_delta": y})
            for x, y, z in values]
    assert_same(rows)


def test_random_doubles_of_every_exponent_are_written_as_float_repr():
    rng = np.random.default_rng(2024)
    bits = rng.integers(0, 2**63, size=60_000, dtype=np.uint64) | (rng.integers(0, 2, 60_000, dtype=np.uint64) << 63)
    values = [v for v in bits.view(np.float64).tolist() if math.isfinite(v)]
    values += [float(x) for x in rng.standard_normal(3000).astype(np.float32)]  # float32 data, widened
    values += [v * 10.0**e for v in (1.0, 2.5, 9.999999999999998) for e in range(-320, 308)]
    values += [math.ldexp(1.0, e) for e in range(-1074, 1024)] + [math.ldexp(3.0, e) for e in range(-1074, 1023)]
    values += [math.ldexp(float(m), -1074) for m in range(1, 3000)]  # subnormals
    values += [float(n) for n in range(-1000, 1000)] + [float(2**53 - n) for n in range(100)]
    rows = [TensorDiff("t", "changed", max_abs_delta=values[i], mean_abs_delta=values[i + 1],
                       rel_l2=values[i + 2], cause_detail={"x": values[i + 3]})
            for i in range(0, len(values) - 3, 4)]
    got = c_rows(rows, True)
    assert got is not None and got == python_rows(rows, True)
    # and as json reads them back
    assert [t["max_abs_delta"] for t in json.loads("[" + got + "]")] == [t.max_abs_delta for t in rows]


def test_an_empty_batch_is_empty():
    assert _crows.encode_rows([], True) == "" == _crows.encode_rows([], False)


# ---------------------------------------------------------------------------
# what the C writer declines
# ---------------------------------------------------------------------------

class Name(str):
    pass


class Shape(list):
    pass


def _declined() -> list[dict]:
    return [
        {"merge": MergeCheck("merge-exact", kind="lora", rank=4, scaling=2.0)},
        {"name": Name("w")}, {"status": Name("changed")}, {"dtype_old": Name("float32")}, {"cause": 1},
        {"name": None}, {"role": None}, {"drift": 1}, {"stale": None}, {"drift": np.bool_(True)},
        {"max_abs_delta": np.float64(0.5)}, {"max_abs_delta": np.float32(0.5)}, {"rel_l2": [1.0]},
        {"numel": np.int64(3)}, {"changed_elements": math.nan}, {"nan_new": math.inf}, {"numel": -math.inf},
        {"out_of_tolerance": [1]},
        {"shape_old": [1, True]}, {"shape_new": [1.0]}, {"shape_old": Shape([1])}, {"shape_new": "ab"},
        {"shape_old": [np.int64(2)]}, {"shape_new": 0},
        {"cause_detail": {1: 2}}, {"cause_detail": {Name("k"): 1}}, {"cause_detail": {"first": [1, 2.0]}},
        {"cause_detail": {"first": [True]}}, {"cause_detail": {"d": {"e": 1}}}, {"cause_detail": {"x": np.float64(1)}},
        {"cause_detail": {"x": Name("v")}}, {"cause_detail": [("a", 1)]}, {"cause_detail": "x"},
    ]


@pytest.mark.parametrize("change", _declined(), ids=lambda c: repr(c)[:40])
def test_values_outside_the_c_writer_make_it_decline_and_render_rows_still_agree(change):
    good = TensorDiff("ok", "changed", "frozen", True, False, "float32", "float32", [2], [2], 2, "a", "b", 0.5,
                      0.25, 0.1, 2, 0, 0, 2, "dense_update", {"cosine": 0.5, "uniformity": 1.0})
    odd = good.copy()
    for k, v in change.items():
        setattr(odd, k, v)
    rows = [good, odd, good]
    assert c_rows(rows, True) is None and c_rows([odd], False) is None
    try:
        want = python_rows(rows, True)
    except render._Unsupported:
        with pytest.raises(render._Unsupported):
            render._rows(rows, True)
    else:
        assert render._rows(rows, True) == want


@pytest.mark.parametrize("rows", [None, (), "rows", [None], [()], [tuple(range(21))], [tuple(range(23))],
                                  [[None] * 22]])
def test_anything_but_a_list_of_22_tuples_is_declined(rows):
    assert _crows.encode_rows(rows, True) is None


def test_an_int_too_long_for_repr_is_declined():
    row = TensorDiff("t", "changed", numel=10**5000)
    assert c_rows([row], True) is None
    with pytest.raises(ValueError):  # what int.__repr__ says, through the Python writer
        python_rows([row], True)


def test_a_subclass_of_tensor_diff_takes_the_python_path(monkeypatch):
    class Row(TensorDiff):
        __slots__ = ()

        def to_dict(self):
            return {"name": self.name}

    calls = []
    monkeypatch.setattr(render, "_crows", type("C", (), {"encode_rows": staticmethod(
        lambda rows, first: calls.append(rows) or _crows.encode_rows(rows, first))}))
    plain = TensorDiff("a", "identical")
    assert render._rows([plain, Row("b", "identical")], True) == python_rows([plain, Row("b", "identical")], True)
    assert calls == []
    render._rows([plain], True)
    assert len(calls) == 1
