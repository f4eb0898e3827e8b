"""CkptdiffCallback in real Lightning Trainer runs (a frozen BatchNorm backbone and a head, CPU, a few steps)."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning.pytorch" if importlib.util.find_spec("lightning") else "pytorch_lightning")

from integ_helpers import as_numpy, history, snapshot_array, snapshot_rows  # noqa: E402

from ckptdiff.cli import main as cli  # noqa: E402
from ckptdiff.hook import AuditWarning, DriftWarning, FrozenDriftError, open_tracker  # noqa: E402
from ckptdiff.integrations.lightning import CkptdiffCallback  # noqa: E402

nn = torch.nn
PACKAGES = [p for p in ("lightning.pytorch", "pytorch_lightning") if importlib.util.find_spec(p.split(".")[0])]


def lightning_module(pl, *, backbone_eval: bool):
    """A head trained on a frozen backbone that has BatchNorm: the classic place frozen weights move."""

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
            self.head = nn.Linear(16, 2)
            self.backbone.requires_grad_(False)

        def on_train_epoch_start(self) -> None:
            if backbone_eval:
                self.backbone.eval()  # the fix: Lightning put the whole module in train mode

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.head(self.backbone(x)), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    return Classifier()


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def trainer(pl, callbacks, **options):
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, enable_checkpointing=False, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **options)


class WeightPerStep:
    """The reference: a parameter at the end of each batch, by ``trainer.global_step`` (the last wins)."""

    def __init__(self, pl, name: str = "head.weight") -> None:
        outer = self
        self.after: dict[int, np.ndarray] = {}
        self.batches = 0

        class Recorder(pl.Callback):
            def on_train_batch_end(self, trainer, module, *args):
                outer.after[trainer.global_step] = as_numpy(module.get_parameter(name))
                outer.batches += 1

        self.callback = Recorder()


@pytest.mark.parametrize("package", PACKAGES)
def test_clean_run_with_accumulation_snapshots_each_optimizer_step(tmp_path, package):
    pl = importlib.import_module(package)
    store = tmp_path / "runs"
    module = lightning_module(pl, backbone_eval=True)
    reference = WeightPerStep(pl)
    callback = CkptdiffCallback(store=store, every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        warnings.simplefilter("error", AuditWarning)
        trainer(pl, [reference.callback, callback], max_steps=3, accumulate_grad_batches=2).fit(module, loader())

    assert reference.batches == 6  # two batches per optimizer step
    assert history(store) == [(0, "baseline"), (1, None), (2, None), (3, None), (3, "final")]
    rows = snapshot_rows(store)
    assert [r.drift for r in rows] == [0] * 5
    assert sorted(callback.tracker.manifest.trainable) == ["head.bias", "head.weight"]
    assert "backbone.1.running_mean" in callback.tracker.manifest.frozen  # a frozen module's BN stats
    # The snapshot at step k holds the weights after the k-th optimizer step, not after the k-th batch.
    for step in (1, 2, 3):
        np.testing.assert_array_equal(snapshot_array(store, f"step:{step}", "head.weight"),
                                      reference.after[step])
        assert isinstance(rows[step].info.metrics["train_loss"], float)
    assert open_tracker(module) is None


def test_batchnorm_in_train_mode_is_caught_at_step_one_and_closes_on_the_exception(tmp_path):
    pl = importlib.import_module(PACKAGES[0])
    store = tmp_path / "runs"
    module = lightning_module(pl, backbone_eval=False)
    mean_before = as_numpy(module.backbone[1].running_mean)
    callback = CkptdiffCallback(store=store, every=2, on_drift="raise")
    with pytest.warns(AuditWarning, match="frozen-batchnorm-train"), pytest.raises(FrozenDriftError) as info:
        trainer(pl, [callback], max_steps=4).fit(module, loader())

    assert info.value.step == 1
    moved = sorted(n for e in info.value.events for n in e.names)
    assert moved == ["backbone.1.num_batches_tracked", "backbone.1.running_mean", "backbone.1.running_var"]
    assert history(store) == [(0, "baseline"), (1, "drift"), (1, "interrupted")]
    np.testing.assert_array_equal(snapshot_array(store, "baseline", "backbone.1.running_mean"), mean_before)
    np.testing.assert_array_equal(snapshot_array(store, "drift", "backbone.1.running_mean"),
                                  as_numpy(module.backbone[1].running_mean))
    assert open_tracker(module) is None  # on_exception closed it
    assert cli(["diff", f"{store}@baseline", f"{store}@interrupted", "--quiet", "--no-progress"]) == 1


def test_two_optimizers_are_counted_by_global_step(tmp_path):
    pl = importlib.import_module(PACKAGES[0])
    store = tmp_path / "runs"

    class TwoHeads(pl.LightningModule):
        """Manual optimization with an optimizer per head (the GAN shape): no single step() to hook."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.backbone = nn.Linear(8, 16).requires_grad_(False)
            self.a, self.b = nn.Linear(16, 2), nn.Linear(16, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for head, opt in zip((self.a, self.b), self.optimizers()):
                opt.zero_grad()
                self.manual_backward(nn.functional.cross_entropy(head(self.backbone(x)), y))
                opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    module = TwoHeads()
    reference = WeightPerStep(pl, "b.weight")
    callback = CkptdiffCallback(store=store, every=2)
    trainer(pl, [reference.callback, callback], max_steps=4).fit(module, loader())

    assert reference.batches == 2  # each batch steps both optimizers: Lightning counts 2 global steps
    assert callback.tracker.current_step == 4
    assert history(store) == [(0, "baseline"), (2, None), (4, None), (4, "final")]
    assert sorted(callback.tracker.manifest.trainable) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    for step in (2, 4):
        np.testing.assert_array_equal(snapshot_array(store, f"step:{step}", "b.weight"), reference.after[step])
    assert [r.drift for r in snapshot_rows(store)] == [0] * 4


def test_resumed_fit_continues_the_history_from_the_checkpoint_step(tmp_path):
    pl = importlib.import_module(PACKAGES[0])
    store = tmp_path / "runs"
    first = trainer(pl, [CkptdiffCallback(store=store, every=2)], max_steps=2)
    first.fit(lightning_module(pl, backbone_eval=True), loader())
    first.save_checkpoint(tmp_path / "step2.ckpt")
    after_two = snapshot_array(store, "latest", "head.weight")

    module = lightning_module(pl, backbone_eval=True)
    trainer(pl, [CkptdiffCallback(store=store, every=2)], max_steps=4).fit(
        module, loader(), ckpt_path=str(tmp_path / "step2.ckpt"))

    assert history(store) == [(0, "baseline"), (2, None), (2, "final"), (2, "baseline"), (4, None), (4, "final")]
    rows = snapshot_rows(store)
    np.testing.assert_array_equal(snapshot_array(store, rows[3].info.id, "head.weight"), after_two)
    np.testing.assert_array_equal(snapshot_array(store, "latest", "head.weight"), as_numpy(module.head.weight))
