"""``ckptdiff.track`` on the model and optimizer ``accelerate`` prepared, in a real accumulation loop (CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

from integ_helpers import as_numpy, history, snapshot_array, snapshot_rows  # noqa: E402

import ckptdiff  # noqa: E402
from ckptdiff.hook import AuditWarning, DriftWarning  # noqa: E402

nn = torch.nn


def test_prepared_model_and_optimizer_are_tracked_per_real_update(tmp_path):
    store = tmp_path / "runs"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, 2, (24,), generator=g))
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=4))
    assert type(optimizer).__name__ == "AcceleratedOptimizer"  # a wrapper around the AdamW, taken as it is

    after: dict[int, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        warnings.simplefilter("error", AuditWarning)
        with ckptdiff.track(model, optimizer, store=store, every=1) as tracker:
            for x, y in loader:
                with accelerator.accumulate(model):
                    loss = nn.functional.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    optimizer.step()  # called on every batch; updates only when gradients sync
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    tracker.log(loss=loss)
                    after[len(after) + 1] = as_numpy(accelerator.unwrap_model(model)[2].weight)

    assert len(after) == 3  # six batches, two per update
    assert history(store) == [(0, "baseline"), (1, None), (2, None), (3, None)]
    assert sorted(tracker.manifest.trainable) == ["2.bias", "2.weight"]  # the model's own names
    for step, weight in after.items():
        np.testing.assert_array_equal(snapshot_array(store, f"step:{step}", "2.weight"), weight)
    rows = snapshot_rows(store)
    assert [r.drift for r in rows] == [0] * 4
    assert all(isinstance(r.info.metrics["loss"], float) for r in rows[1:])
