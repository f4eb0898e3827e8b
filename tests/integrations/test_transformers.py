"""CkptdiffCallback in real Hugging Face Trainer runs (tiny BERT built from a config, CPU, a few steps)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from integ_helpers import as_numpy, history, snapshot_array, snapshot_rows  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckptdiff.cli import main as cli  # noqa: E402
from ckptdiff.hook import AuditWarning, DriftWarning, FrozenDriftError, open_tracker  # noqa: E402
from ckptdiff.integrations.transformers import CkptdiffCallback  # noqa: E402


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    """Random token ids and labels from a seeded generator (no tokenizer, no download)."""

    def __init__(self, n: int = 64, length: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                   learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                   disable_tqdm=True, seed=0, dataloader_num_workers=0)
    options.update(overrides)
    return TrainingArguments(**options)


def freeze(module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class WeightsPerStep(TrainerCallback):
    """The reference: a copy of one parameter after each optimizer step, keyed by ``state.global_step``."""

    def __init__(self, parameter) -> None:
        self.parameter = parameter
        self.after: dict[int, np.ndarray] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = as_numpy(self.parameter)


def test_frozen_encoder_run_has_clean_history_with_the_trainers_metrics(tmp_path):
    store = tmp_path / "runs"
    model = tiny_bert()
    freeze(model.bert)
    encoder_before = as_numpy(model.bert.encoder.layer[0].attention.self.query.weight)
    callback = CkptdiffCallback(store=store, every=2)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=Tokens(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        warnings.simplefilter("error", AuditWarning)
        trainer.train()

    assert history(store) == [(0, "baseline"), (2, None), (4, None), (4, "final")]
    assert callback.tracker.drift_events == [] and callback.tracker.errors == []
    assert open_tracker(model) is None  # closed at on_train_end
    # The manifest is what the Trainer's optimizer really updates: the head only.
    assert sorted(callback.tracker.manifest.trainable) == ["classifier.bias", "classifier.weight"]
    rows = snapshot_rows(store)
    assert [r.drift for r in rows] == [0, 0, 0, 0]
    # Each snapshot carries the loss the Trainer logged at its step.
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    for row in rows[1:3]:
        assert row.info.metrics["loss"] == pytest.approx(logged[row.info.step])
    assert rows[2].info.metrics["train_loss"] == pytest.approx(trainer.state.log_history[-1]["train_loss"])
    # The final snapshot holds the trained head and the untouched encoder, exactly.
    np.testing.assert_array_equal(snapshot_array(store, "final", "classifier.weight"),
                                  as_numpy(model.classifier.weight))
    assert not np.array_equal(snapshot_array(store, "baseline", "classifier.weight"),
                              as_numpy(model.classifier.weight))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    np.testing.assert_array_equal(snapshot_array(store, "final", name), encoder_before)
    # The CLI's verdict on the run: no drift between the baseline and the final snapshot.
    assert cli(["diff", f"{store}@baseline", f"{store}@final", "--quiet", "--no-progress"]) == 0


class ZeroGradsForFrozen(TrainerCallback):
    """From step ``start`` on, the frozen encoder gets zero gradients instead of none.

    What DDP's static graph, a custom gradient-accumulation loop or
    ``zero_grad(set_to_none=False)`` after a warm-up leave behind; with the
    frozen weights in an AdamW with weight decay, they start to move.
    """

    def __init__(self, module, start: int) -> None:
        self.params = list(module.parameters())
        self.start = start

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 >= self.start:
            for p in self.params:
                p.grad = torch.zeros_like(p)


def test_drift_from_an_optimizer_over_all_params_stops_training_at_the_step_it_happens(tmp_path):
    store = tmp_path / "runs"
    model = tiny_bert()
    freeze(model.bert)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # the frozen encoder too
    args = training_args(tmp_path, max_steps=6, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, None), callbacks=[ZeroGradsForFrozen(model.bert, start=3)])
    callback = CkptdiffCallback(store=store, every=2, on_drift="raise").add_to(trainer)
    with pytest.warns(AuditWarning, match="frozen-in-optimizer"), pytest.raises(FrozenDriftError) as info:
        trainer.train()

    assert info.value.step == 3  # the third optimizer step is the first that moves the encoder
    assert trainer.state.global_step == 2  # raised inside step 3, before the Trainer counted it
    assert {e.last_clean_step for e in info.value.events} == {2}
    assert all(n.startswith("bert.") for e in info.value.events for n in e.names)
    # Decoupled weight decay is what moved them: W' = W * (1 - lr * wd), not an Adam step.
    name = "bert.encoder.layer.0.attention.self.query.weight"
    before = snapshot_array(store, "baseline", name)
    np.testing.assert_allclose(snapshot_array(store, "drift", name), before * (1 - 1e-3 * 0.01), rtol=1e-6)
    # The exception closed the tracker at once and recorded where the run stopped.
    assert history(store) == [(0, "baseline"), (2, None), (3, "drift"), (3, "interrupted")]
    assert open_tracker(model) is None and callback.tracker.errors == []
    assert cli(["diff", f"{store}@baseline", f"{store}@drift", "--quiet", "--no-progress"]) == 1


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    store = tmp_path / "runs"
    model = tiny_bert()
    freeze(model.bert)
    reference = WeightsPerStep(model.classifier.weight)
    callback = CkptdiffCallback(store=store, every=1)
    args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[reference, callback])
    batches = []
    trainer.add_callback(type("CountBatches", (TrainerCallback,), {
        "on_substep_end": lambda self, *a, **k: batches.append("micro"),
        "on_step_end": lambda self, *a, **k: batches.append("step")})())
    trainer.train()

    assert batches == ["micro", "step"] * 3  # two micro-batches per optimizer step, really
    assert history(store) == [(0, "baseline"), (1, None), (2, None), (3, None), (3, "final")]
    # The snapshot at step k holds the weights after the k-th optimizer step, not the k-th micro-batch.
    for step in (1, 2, 3):
        np.testing.assert_array_equal(snapshot_array(store, f"step:{step}", "classifier.weight"),
                                      reference.after[step])


def test_resumed_run_continues_the_history_from_the_checkpoint_step(tmp_path):
    store = tmp_path / "runs"
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    model = tiny_bert()
    freeze(model.bert)
    Trainer(model=model, args=args, train_dataset=Tokens(),
            callbacks=[CkptdiffCallback(store=store, every=2)]).train()
    first_run = history(store)

    model = tiny_bert(seed=1)  # other initial weights: the checkpoint's must replace them
    freeze(model.bert)
    args = training_args(tmp_path, max_steps=6, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[CkptdiffCallback(store=store, every=2)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))

    assert first_run == [(0, "baseline"), (2, None), (4, None), (4, "final")]
    assert history(store) == first_run + [(2, "baseline"), (4, None), (6, None), (6, "final")]
    # The resumed baseline is the checkpoint's weights: the first run's snapshot at step 2, bit for bit.
    rows = snapshot_rows(store)
    np.testing.assert_array_equal(snapshot_array(store, rows[4].info.id, "classifier.weight"),
                                  snapshot_array(store, rows[1].info.id, "classifier.weight"))
    assert [r.drift for r in rows] == [0] * 8


def test_peft_lora_run_trains_only_the_adapters_and_checks_the_whole_base(tmp_path):
    peft = pytest.importorskip("peft")
    store = tmp_path / "runs"
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(tiny_bert(), config)
    requires_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad)  # PEFT's own answer
    callback = CkptdiffCallback(store=store, every=2)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=Tokens(),
                      callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        trainer.train()

    manifest = callback.tracker.manifest
    assert sorted(manifest.trainable) == requires_grad
    assert all(".lora_" in n or ".modules_to_save." in n for n in manifest.trainable)
    assert sum(".lora_A." in n for n in manifest.trainable) == 4  # query and value of 2 layers
    base = "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.weight"
    assert base in manifest.frozen
    assert len(manifest.frozen) > len(manifest.trainable)  # the whole base model is watched
    assert callback.tracker.drift_events == []
    assert [r.drift for r in snapshot_rows(store)] == [0, 0, 0, 0]
    lora_b = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.default.weight"
    assert not np.any(snapshot_array(store, "baseline", lora_b))  # LoRA's B starts at zero...
    np.testing.assert_array_equal(snapshot_array(store, "final", lora_b), as_numpy(model.get_parameter(lora_b)))
    assert np.any(snapshot_array(store, "final", lora_b))  # ... and trained
    np.testing.assert_array_equal(snapshot_array(store, "final", base), snapshot_array(store, "baseline", base))


class CrashAt(TrainerCallback):
    """Fails the run after optimizer step ``step`` (a dead data loader, an OOM: no Trainer event follows)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("the data loader died")


def test_a_run_that_raised_is_closed_by_the_next_train_call(tmp_path):
    store = tmp_path / "runs"
    model = tiny_bert()
    freeze(model.bert)
    crash = CrashAt(2)
    callback = CkptdiffCallback(store=store, every=10)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=Tokens(),
                      callbacks=[crash, callback])
    with pytest.raises(RuntimeError, match="data loader died"):
        trainer.train()
    first = callback.tracker
    assert open_tracker(model) is first  # the Trainer has no exception event: without add_to it stays open
    crash.step = None
    trainer.train()

    assert callback.tracker is not first and open_tracker(model) is None and first.errors == []
    assert history(store) == [(0, "baseline"), (2, "interrupted"), (0, "baseline"), (3, "final")]


def test_attaches_before_the_first_update_when_the_optimizer_is_created_late(tmp_path):
    store = tmp_path / "runs"
    model = tiny_bert()
    args = training_args(tmp_path)
    state, control = transformers.TrainerState(global_step=5), transformers.TrainerControl()
    callback = CkptdiffCallback(store=store, every=1, manifest=["classifier.*"])
    callback.on_train_begin(args, state, control, model=model, optimizer=None)
    assert callback.tracker is None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a Trainer that builds it after the event
    callback.on_step_begin(args, state, control, model=model, optimizer=optimizer)
    batch = Tokens()[0:4]
    with pytest.warns(DriftWarning, match="moved at step 6"):  # the manifest says only the head trains
        model(**batch).loss.backward()
        optimizer.step()
    state.global_step = 6
    callback.on_log(args, state, control, logs={"loss": 0.25, "note": [1]})
    callback.on_train_end(args, state, control)

    assert sorted(callback.tracker.manifest.trainable) == ["classifier.bias", "classifier.weight"]
    assert history(store) == [(5, "baseline"), (6, "drift"), (6, None), (6, "final")]
    assert snapshot_rows(store)[2].info.metrics == {"loss": 0.25}  # the list-valued log is left out
