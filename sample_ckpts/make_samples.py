#!/usr/bin/env python
"""Regenerate the committed sample checkpoints.

Three checkpoints of one small real model (an MLP whose ``backbone`` has a
BatchNorm1d, plus a ``head``), each trained with a real torch loop:

* ``base``: the "pretrained" model, all parameters trained on task A.
* ``finetune_clean``: a correct selective fine-tune on task B. Only ``head.*``
  is in the optimizer and the backbone is in eval mode, so only the
  manifest-trainable tensors change.
* ``finetune_drifted``: the same fine-tune written the common wrong way.
  AdamW was built over *all* parameters, a grad-norm logging pass allocated
  ``.grad`` for the backbone before it was frozen with
  ``requires_grad_(False)``, and ``zero_grad(set_to_none=False)`` keeps those
  grads as zero tensors. AdamW therefore keeps applying weight decay to the
  "frozen" backbone (tiny moves, ~0.3% relative), and because the model
  stayed in ``train()`` mode the BatchNorm running statistics moved too.

Each is written as ``.safetensors``, ``.pt`` (a nested training checkpoint:
``{'state_dict', 'trainable_keys', 'optimizer', 'epoch'}``), ``.h5`` and
``.npz``; ``manifest.json`` says ``head.*`` is trainable (and the .pt files'
``optimizer.*`` state is a buffer, free to change).

Determinism: fixed seeds, one thread, deterministic algorithms, HDF5
without timestamps, .npz written with fixed zip timestamps, no times in
metadata. Re-running on one machine produces identical bytes; another CPU
rounds torch's kernels differently, so the tests compare a regeneration with
the committed files by names, layouts, values within a tolerance and diff
verdicts, not by bytes.

Usage: ``python sample_ckpts/make_samples.py [OUT_DIR]`` (default: this folder).
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile

import h5py
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

IN, HIDDEN, CLASSES = 32, 96, 8
#: Only the head is meant to train. Optimizer state in the .pt files is
#: expected to change: it is listed as buffers, so it never counts as drift.
MANIFEST = {"trainable": ["head.*"], "buffers": ["optimizer.*"]}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        )
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_task(seed: int, n: int = 512, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic classification task: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g) * 1.5 + shift
    teacher = torch.randn(IN, CLASSES, generator=g)
    y = (x @ teacher).argmax(dim=1)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, bs: int = 64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            yield x[idx], y[idx]


def train_base() -> tuple[SmallNet, torch.optim.Optimizer, int]:
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_task(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    epochs = 6
    for xb, yb in batches(x, y, seed=2, epochs=epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    return model, opt, epochs


def finetune_clean(base: dict[str, torch.Tensor]) -> tuple[SmallNet, torch.optim.Optimizer, int]:
    """The correct recipe: only the head in the optimizer, frozen backbone in eval mode."""
    model = SmallNet()
    model.load_state_dict(base)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = make_task(seed=3, shift=0.5)
    epochs = 4
    for xb, yb in batches(x, y, seed=4, epochs=epochs):
        model.backbone.eval()
        model.head.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    return model, opt, epochs


def finetune_drifted(base: dict[str, torch.Tensor]) -> tuple[SmallNet, torch.optim.Optimizer, int]:
    """The same fine-tune with two common mistakes (see the module docstring)."""
    model = SmallNet()
    model.load_state_dict(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)  # mistake 1: all params
    x, y = make_task(seed=3, shift=0.5)
    model.train()  # mistake 2: never switched the frozen backbone to eval
    # A grad-norm logging pass before freezing allocates .grad everywhere.
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    epochs = 4
    for xb, yb in batches(x, y, seed=4, epochs=epochs):
        opt.zero_grad(set_to_none=False)  # backbone grads stay zero tensors, so AdamW still decays them
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    return model, opt, epochs


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_all(out: str, stem: str, model: nn.Module, opt: torch.optim.Optimizer, epochs: int,
              trainable_keys: list[str]) -> None:
    sd = state_dict(model)
    save_file(sd, os.path.join(out, f"{stem}.safetensors"))
    torch.save({"state_dict": sd, "trainable_keys": trainable_keys,
                "optimizer": opt.state_dict(), "epoch": epochs}, os.path.join(out, f"{stem}.pt"))
    with h5py.File(os.path.join(out, f"{stem}.h5"), "w") as f:
        for name, t in sd.items():
            f.create_dataset(name.replace(".", "/"), data=t.numpy(), track_times=False)
    write_npz(os.path.join(out, f"{stem}.npz"), {k: v.numpy() for k, v in sd.items()})


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr).copy(order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(out, exist_ok=True)

    base_model, base_opt, base_epochs = train_base()
    base = state_dict(base_model)
    all_params = [n for n, _ in base_model.named_parameters()]
    write_all(out, "base", base_model, base_opt, base_epochs, all_params)

    head_keys = [n for n, _ in base_model.named_parameters() if n.startswith("head.")]
    clean, clean_opt, clean_epochs = finetune_clean(base)
    drifted, drifted_opt, drifted_epochs = finetune_drifted(base)
    write_all(out, "finetune_clean", clean, clean_opt, clean_epochs, head_keys)
    write_all(out, "finetune_drifted", drifted, drifted_opt, drifted_epochs, head_keys)

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(MANIFEST, f, indent=2)
        f.write("\n")

    # The samples are only useful if they show what they claim: check it here.
    csd, dsd = state_dict(clean), state_dict(drifted)
    for name in base:
        if name.startswith("backbone."):
            assert torch.equal(base[name], csd[name]), f"clean fine-tune moved frozen {name}"
    moved = [n for n in base if n.startswith("backbone.") and not torch.equal(base[n], dsd[n])]
    assert moved, "drifted fine-tune did not drift"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
