"""The hand-written script people use today, as the benchmark's "before".

Load both checkpoints whole with torch (safetensors through
``safetensors.torch``), then per tensor ``(a - b).abs().max()`` and
``hashlib.sha256`` of each side's bytes. Run as its own process so its
start-up and peak RSS are measured the same way as ckptdiff's.

usage: python _baseline_script.py OLD NEW
"""

from __future__ import annotations

import hashlib
import sys


def load(path: str):  # -> dict[str, torch.Tensor]
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256(t) -> str:  # noqa: ANN001
    import torch

    return hashlib.sha256(t.contiguous().view(-1).view(dtype=torch.uint8).numpy()).hexdigest()


def main(old: str, new: str) -> int:
    a, b = load(old), load(new)
    changed = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            changed += 1
            continue
        x, y = a[name], b[name]
        max_abs = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        ha, hb = sha256(x), sha256(y)
        changed += ha != hb
        del max_abs
    print(f"{changed} of {len(set(a) | set(b))} tensors changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
