"""The shipped sample history: a real torch fine-tune whose frozen layer drifts.

``sample_ckpts/make_history.py`` trains a tiny BatchNorm model with AdamW;
from step 40 a grad hook zeroes ``encoder.0``'s gradient instead of leaving it
None, so weight decay moves the "frozen" layer. A new user opening the sample
must see that layer at once: these tests open it the way they would.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from tui_helpers import run_async, settle

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # trains a model (a few seconds)

from ckptdiff.store import Store  # noqa: E402
from ckptdiff.tui.app import CkptdiffApp  # noqa: E402
from ckptdiff.tui.detail_screen import DetailScreen  # noqa: E402
from ckptdiff.tui.tensor_table import DRIFT_STYLE, STALE_STYLE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "sample_ckpts", "history")


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_history", os.path.join(ROOT, "sample_ckpts",
                                                                             "make_history.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fresh_history(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sample") / "history")
    assert load_script().main(["--out", out]) == 0
    return out


#: How far a regenerated value may lie from the shipped one, relative to the
#: tensor's largest shipped magnitude. torch's CPU kernels round differently
#: from one CPU to another (about 2e-7 between an AMD EPYC and an Intel Xeon),
#: so the shipped store is the reference and bytes are not compared.
VALUE_TOLERANCE = 1e-4


def history(path: str) -> list[tuple[object, ...]]:
    """Per snapshot: what a reader sees without the values (steps, tags, metrics, layouts, manifest)."""
    with Store.open(path) as s:
        return [(i.step, i.tag, i.message, sorted(i.metrics), s.effective_manifest(i.id).to_dict(),
                 {n: (e.dtype, e.shape) for n, e in s.entries(i.id).items()}) for i in s.list()]


def unchanged_since_previous(path: str) -> list[set[str]]:
    """Per snapshot after the first: the tensors bitwise equal to the previous snapshot's."""
    with Store.open(path) as s:
        entries = [s.entries(i.id) for i in s.list()]
    return [{n for n, e in cur.items() if prev[n].hash == e.hash} for prev, cur in zip(entries, entries[1:])]


def test_script_reproduces_the_shipped_store(fresh_history) -> None:
    assert history(fresh_history) == history(SHIPPED)
    assert unchanged_since_previous(fresh_history) == unchanged_since_previous(SHIPPED)
    with Store.open(fresh_history) as fresh, Store.open(SHIPPED) as shipped:
        for a, b in zip(fresh.list(), shipped.list()):
            for k, v in b.metrics.items():
                assert a.metrics[k] == pytest.approx(v, abs=1e-3), (b.step, k)
            x, y = fresh.open_snapshot(a.id), shipped.open_snapshot(b.id)
            for n in y:
                old, new = y[n].numpy().astype(np.float64), x[n].numpy().astype(np.float64)
                bound = VALUE_TOLERANCE * float(np.abs(old).max(initial=0.0))
                assert float(np.abs(new - old).max(initial=0.0)) <= bound, (b.step, n)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size < 1 << 20


def test_the_drift_is_real_weight_decay(fresh_history) -> None:
    """Between snapshots the frozen weight shrinks by AdamW's (1 - lr*wd) per step, nothing else."""
    with Store.open(fresh_history) as s:
        snaps = s.list()
        w = [s.open_snapshot(i.id)["encoder.0.weight"].numpy().astype(np.float64) for i in snaps]
    steps = [i.step for i in snaps]
    phase2 = steps.index(40)
    for k in range(1, phase2 + 1):
        assert np.array_equal(w[k], w[0])           # clean while frozen properly
    for k in range(phase2 + 1, len(w)):
        ratio = w[k] / w[k - 1]
        assert np.allclose(ratio, (1 - 5e-3 * 0.01) ** 10, rtol=1e-5)  # 10 steps of decoupled decay


@run_async
async def test_new_user_sees_the_drifted_layer_first(fresh_history) -> None:
    app = CkptdiffApp(store=fresh_history)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        table = app.screen.table
        top = [r.name for r in table.shown[:2]]
        assert sorted(top) == ["encoder.0.bias", "encoder.0.weight"]
        assert all(str(table.row_cells(n)[1].style) == DRIFT_STYLE for n in top)
        stale = sorted(r.name for r in table.shown if r.stale)
        assert stale == ["adapter.bias", "adapter.weight"]
        assert str(table.row_cells("adapter.weight")[1].style) == STALE_STYLE
        # BatchNorm running stats moved, but they are buffers: not drift
        bn = table.all_rows["encoder.1.running_mean"]
        assert bn.status == "changed" and bn.role == "buffer" and not bn.drift
        # Enter on the top row: the detail says when it started
        await pilot.press("tab", "enter")
        await settle(pilot)
        assert isinstance(app.screen, DetailScreen)
        assert "first drifted at snapshot #5 (step 50)" in str(app.screen.query_one("#first-drift").render())
