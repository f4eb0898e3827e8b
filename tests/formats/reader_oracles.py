"""Differential checks of ckptdiff's readers against the owning libraries.

The rule under test: for any file, either ckptdiff refuses it (a CkptError:
one line, exit 2 under the CLI) or the reference library loads it and every
tensor ckptdiff exposes has the reference's name, dtype, shape and bytes.
The reference is ``torch.load(weights_only=True)`` for .pt files and the
``safetensors`` library for .safetensors files.

Used by tests/formats/test_reader_oracles.py (a few examples per run) and by
benchmarks/fuzz_readers.py (as many as asked). The reference is only asked
about files ckptdiff accepted: a hostile file is never handed to it.
"""

from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Callable

from ckptdiff.errors import CkptError
from ckptdiff.formats import open_checkpoint

#: What a reader produced: name -> (dtype name, shape, bytes).
Tensors = dict[str, tuple[str, tuple[int, ...], bytes]]


class Disagreement(AssertionError):
    """ckptdiff accepted a file and read something other than the reference."""


# ---- reading both ways ----------------------------------------------------------------------

def ckptdiff_tensors(path: str) -> Tensors | None:
    """What ckptdiff reads, or None when it refuses the file (any CkptError)."""
    try:
        ck = open_checkpoint(path)
    except CkptError:
        return None
    try:
        return {n: (r.dtype, tuple(r.shape), r.read()) for n, r in ck.items()}
    except CkptError:
        return None
    finally:
        ck.close()


def torch_tensors(path: str) -> Tensors:
    """What ``torch.load(weights_only=True)`` loads, named as ckptdiff names it (raises if torch refuses)."""
    import torch

    from ckptdiff.dtypes import TORCH_NAMES
    from ckptdiff.formats import torch_format

    obj = torch.load(path, weights_only=True, map_location="cpu")
    tensors, *_ = torch_format._flatten_checkpoint(torch, obj, path)
    out: Tensors = {}
    for name, t in tensors.items():
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in TORCH_NAMES or t.layout != torch.strided or t.is_quantized:
            continue  # types the dtype table cannot hold: ckptdiff lists them as skipped
        src = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
        raw = src.view(torch.uint8).numpy().tobytes() if src.numel() else b""
        out[name] = (TORCH_NAMES[dt], tuple(t.shape), raw)
    return out


def safetensors_tensors(path: str) -> Tensors:
    """What the ``safetensors`` library loads (raises if it refuses)."""
    import torch
    from safetensors.torch import load_file

    from ckptdiff.dtypes import TORCH_NAMES

    out: Tensors = {}
    for name, t in load_file(path).items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out[name] = (TORCH_NAMES[str(t.dtype).removeprefix("torch.")], tuple(t.shape), raw)
    return out


def check(path: str, reference: Callable[[str], Tensors]) -> str:
    """"refused" or "equal"; raises :class:`Disagreement` when ckptdiff read other bytes than the reference."""
    ours = ckptdiff_tensors(path)
    if ours is None:
        return "refused"
    try:
        theirs = reference(path)
    except Exception as e:  # noqa: BLE001 - any refusal by the reference
        raise Disagreement(f"ckptdiff accepted a file the reference refuses ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
    if set(ours) != set(theirs):
        raise Disagreement(f"names differ: only ckptdiff {sorted(set(ours) - set(theirs))[:5]}, "
                           f"only reference {sorted(set(theirs) - set(ours))[:5]}")
    for name, mine in ours.items():
        if mine != theirs[name]:
            raise Disagreement(f"tensor {name!r}: ckptdiff {mine[:2]} vs reference {theirs[name][:2]}"
                               + (" (bytes differ)" if mine[:2] == theirs[name][:2] else ""))
    return "equal"


# ---- seed files made by the real libraries -------------------------------------------------

def _dtype_state(torch):  # noqa: ANN001, ANN202
    out = {}
    for i, dt in enumerate([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                            torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                            torch.bool]):
        base = (torch.arange(12, dtype=torch.float32) * 0.75 - 4).reshape(3, 4)
        out[f"t{i}.{str(dt).removeprefix('torch.')}"] = base.to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 2)
    return out


def _training_state(torch):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    return {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "trainable_keys": ["2.weight", "2.bias"], "note": "ok", "shared": {"a": model[0].weight}}


def make_seeds(directory: str) -> dict[str, str]:
    """Write the seed files: flat (all dtypes) and nested training checkpoints, zip and legacy, and safetensors."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    seeds: dict[str, str] = {}
    for kind, make in (("flat", _dtype_state), ("training", _training_state)):
        for legacy in (False, True):
            path = os.path.join(directory, f"{kind}{'-legacy' if legacy else ''}.pt")
            state = make(torch)
            if legacy:  # torch cannot load fp8 from its own legacy format
                state = {k: v for k, v in state.items() if "float8" not in k}
            torch.save(state, path, _use_new_zipfile_serialization=not legacy)
            seeds[os.path.basename(path)] = path
    st = os.path.join(directory, "flat.safetensors")
    save_file(_dtype_state(torch), st, metadata={"format": "pt"})
    seeds["flat.safetensors"] = st
    return seeds


# ---- mutation --------------------------------------------------------------------------------

_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, ord("{"), ord(" "), ord("."), ord("q"), ord("r"))


def _hot_spans(data: bytes) -> list[tuple[int, int]]:
    """Where mutations matter most: a zip's pickle and directory, a safetensors header, a legacy pickle."""
    if data[:4] == b"PK\x03\x04":
        try:
            import io
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                spans = [(i.header_offset, i.header_offset + 64 + i.file_size)
                         for i in zf.infolist() if i.filename.endswith("data.pkl")]
                return spans + [(zf.start_dir, len(data))]
        except zipfile.BadZipFile:
            return [(0, len(data))]
    if data[:1] == b"\x80":
        return [(0, min(len(data), 4096))]
    n = int.from_bytes(data[:8], "little")
    return [(0, min(len(data), 8 + n))]


def mutate(data: bytes, rng: random.Random, n_edits: int) -> bytes:
    """A few random edits, mostly inside the structurally interesting spans."""
    buf = bytearray(data)
    spans = _hot_spans(data)
    for _ in range(n_edits):
        if not buf:
            break
        lo, hi = rng.choice(spans) if rng.random() < 0.8 else (0, len(buf))
        lo = min(lo, len(buf) - 1)
        hi = max(lo + 1, min(hi, len(buf)))
        pos = rng.randrange(lo, hi)
        kind = rng.randrange(6)
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = rng.choice(_INTERESTING)
        elif kind == 2:
            buf[pos] = (buf[pos] + rng.choice((-1, 1, 16, -16))) % 256
        elif kind == 3:
            del buf[pos:pos + rng.randrange(1, 5)]
        elif kind == 4:
            buf[pos:pos] = bytes(rng.choice(_INTERESTING) for _ in range(rng.randrange(1, 5)))
        else:
            del buf[pos:]
    return bytes(buf)


def reference_for(path: str) -> Callable[[str], Tensors]:
    return safetensors_tensors if path.endswith(".safetensors") else torch_tensors


def fuzz_one(seed_path: str, out_path: str, seed: int) -> str:
    """Mutate ``seed_path`` deterministically from ``seed``, write ``out_path``, check it; returns the outcome."""
    rng = random.Random(seed)
    with open(seed_path, "rb") as f:
        data = f.read()
    with open(out_path, "wb") as f:
        f.write(mutate(data, rng, rng.randrange(1, 4)))
    return check(out_path, reference_for(seed_path))


def same_as_reference(path: str) -> bool:
    """For unmutated files: ckptdiff must read exactly what the reference reads."""
    return check(path, reference_for(path)) == "equal"


__all__ = ["Disagreement", "check", "ckptdiff_tensors", "fuzz_one", "make_seeds", "mutate",
           "same_as_reference", "safetensors_tensors", "torch_tensors"]
