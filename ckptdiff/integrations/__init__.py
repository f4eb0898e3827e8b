"""Training-framework adapters for the hook: one callback gives a snapshot history and a live drift alarm.

* :mod:`ckptdiff.integrations.transformers` — ``CkptdiffCallback`` for the
  Hugging Face ``Trainer`` (PEFT models included);
* :mod:`ckptdiff.integrations.lightning` — ``CkptdiffCallback`` for
  Lightning (``lightning.pytorch`` or ``pytorch_lightning``).

``accelerate`` needs no adapter: ``ckptdiff.track(model, optimizer, ...)``
takes the objects ``Accelerator.prepare`` returned.

Each module imports its framework when it is imported itself, never before:
``import ckptdiff`` and ``import ckptdiff.integrations`` stay light.
"""
