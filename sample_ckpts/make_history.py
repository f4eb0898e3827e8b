"""Build ``sample_ckpts/history/``: a small snapshot store of a real fine-tune that goes wrong.

    python sample_ckpts/make_history.py            # (re)writes sample_ckpts/history
    ckptdiff tui sample_ckpts/history              # then look at it

A tiny classifier (a frozen "pretrained" embedding and encoder layer, a
BatchNorm, a trainable head and an adapter) is fine-tuned for 90 steps with
a snapshot every 10 steps. Two bugs from the field are planted:

* **frozen-layer drift** (from step 40): "phase 2" rebuilds the optimizer
  over ``model.parameters()`` and keeps ``encoder.0`` "frozen" with a grad
  hook that zeroes its gradient. The gradient is now a zero tensor instead
  of None, so AdamW's decoupled weight decay keeps shrinking the frozen
  weights by ``lr * weight_decay`` per step: tiny deltas (a weight of 0.1678
  becomes 0.1677) that summary statistics miss and hashes do not.
* **a stale trainable tensor**: ``adapter`` is meant to be trained but was
  never given to the optimizer, so it never changes.

BatchNorm running stats change every step in ``train()`` mode; the manifest
calls them buffers, so they are expected to move. The store's content is
deterministic on one machine (fixed seeds, one thread; another CPU may round the
last bits differently); snapshot ids and timestamps are not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "history")

#: What the fine-tune intends: the store records it with the first snapshot.
MANIFEST = {
    "trainable": ["encoder.1.weight", "encoder.1.bias", "adapter.*", "head.*"],
    "frozen": ["embed.*", "encoder.0.*"],
    "buffers": ["encoder.1.running_mean", "encoder.1.running_var", "encoder.1.num_batches_tracked"],
}

STEPS = 90
EVERY = 10
PHASE2_AT = 40


def build_model():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class TinyClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.encoder = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
            self.adapter = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.encoder(torch.tanh(self.embed(x)))
            return self.head(h + self.adapter(h))

    return TinyClassifier()


def make_data():  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = (x @ w + 0.3 * torch.randn(512, 3, generator=g)).argmax(dim=1)
    return x, y


def train(out: str) -> list[str]:
    import torch
    from torch import nn

    from ckptdiff.checkpoint import Checkpoint
    from ckptdiff.manifest import Manifest
    from ckptdiff.store import Store

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = build_model()
    x, y = make_data()
    loss_fn = nn.CrossEntropyLoss()

    # Phase 1, done right: frozen layers are out of the optimizer and have no grad.
    for p in list(model.embed.parameters()) + list(model.encoder[0].parameters()):
        p.requires_grad_(False)
    trainable = list(model.encoder[1].parameters()) + list(model.head.parameters())  # adapter forgotten
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)

    store = Store.open(out, create=True)
    ids: list[str] = []
    manifest = Manifest.from_dict(MANIFEST, source="make_history.py")
    batch = torch.Generator().manual_seed(2)

    def snapshot(step: int, loss: float, acc: float) -> None:
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        tag = {0: "init", PHASE2_AT: "phase1-done", STEPS: "final"}.get(step)
        msg = {0: "pretrained weights, head re-initialised",
               PHASE2_AT: "end of phase 1; phase 2 rebuilds the optimizer over model.parameters()"}.get(step)
        ids.append(store.snapshot(
            Checkpoint.from_arrays(arrays).tensors, step=step, tag=tag, message=msg,
            metrics={"loss": round(loss, 6), "acc": round(acc, 4)},
            manifest=manifest if step == 0 else None, source="sample_ckpts/make_history.py"))

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(loss_fn(logits, y))
            acc = float((logits.argmax(1) == y).float().mean())
        model.train()
        return loss, acc

    snapshot(0, *evaluate())
    model.train()
    for step in range(1, STEPS + 1):
        if step == PHASE2_AT + 1:
            # Phase 2, the bug: every parameter goes to the optimizer and encoder.0 is
            # "frozen" by zeroing its gradient. Its grad is now zeros, not None, so AdamW's
            # weight decay moves it on every step.
            for p in model.encoder[0].parameters():
                p.requires_grad_(True)
                p.register_hook(lambda g: torch.zeros_like(g))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and
                                     not any(p is q for q in model.adapter.parameters())],
                                    lr=5e-3, weight_decay=0.01)
        idx = torch.randint(0, x.shape[0], (64,), generator=batch)
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            snapshot(step, *evaluate())
    store.close()
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="store directory to (re)create (default: %(default)s)")
    args = ap.parse_args(argv)
    out = args.out
    if os.path.exists(out):
        from ckptdiff.store import is_store
        if not is_store(out) and os.listdir(out):
            print(f"make_history: {out} exists and is not a ckptdiff store; not touching it", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    ids = train(out)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {len(ids)} snapshots to {out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
