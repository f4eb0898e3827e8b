"""Small real models and real training loops for the hook tests (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn


class Net(nn.Module):
    """backbone (conv + BatchNorm) -> head; the classic 'fine-tune the head' shape."""

    def __init__(self, dtype=None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Conv1d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 16, 4)
        if dtype is not None:
            self.to(dtype)

    def forward(self, x):
        return self.head(self.backbone(x).flatten(1))


def make_data(n: int = 32, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, generator=g).to(dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def train_step(model, opt, x, y, *, set_to_none: bool = True) -> float:
    opt.zero_grad(set_to_none=set_to_none)
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def freeze(module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def host(t) -> np.ndarray:
    """A float64 numpy copy of a tensor of any dtype (bf16 via float32), for reference arithmetic."""
    return t.detach().to(torch.float64).cpu().numpy().copy() if t.dtype != torch.bool else t.numpy().astype(np.float64)


def raw(t) -> bytes:
    """The tensor's little-endian C-order bytes (what the store holds)."""
    x = t.detach().contiguous().reshape(-1)
    return x.view(torch.uint8).numpy().tobytes() if x.numel() else b""


