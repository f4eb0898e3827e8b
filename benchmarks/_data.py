"""Deterministic benchmark checkpoints, written once under ``benchmarks/data/``.

Why a hand-rolled safetensors writer: ``safetensors.numpy.save_file`` needs
the whole dict in memory, and the ``--big`` pair is 2 GB a side. Writing the
header first and then one tensor at a time keeps generation at one tensor of
memory, so the memory check measures ckptdiff, not the generator.

Every tensor's values come from its own seeded generator
(``default_rng([seed, index])``), so files are byte-identical across runs and
machines; a small stamp file next to each pair records the spec, so a pair
is regenerated only when the spec changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

#: safetensors dtype code and numpy dtype per benchmark dtype.
_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class PairSpec:
    """One checkpoint pair: shapes, dtype, and which tensors the "fine-tune" moved."""

    name: str
    dtype: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    #: Every ``change_every``-th tensor (by index) differs in B: ~10% at 10.
    change_every: int = 10
    seed: int = 1234
    formats: tuple[str, ...] = ("safetensors",)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        item = 2 if self.dtype in ("bfloat16", "float16") else 4
        return sum(int(np.prod(s)) * item for _, s in self.shapes)

    def changed(self, index: int) -> bool:
        return index % self.change_every == self.change_every // 2

    def stamp(self) -> str:
        d = asdict(self)
        d["version"] = 2
        return json.dumps(d, sort_keys=True)


def transformer_shapes(target_bytes: int, itemsize: int = 4) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A decoder-only LM's tensor list (embedding, per-layer attention/MLP/norms), grown to ~target_bytes.

    Realistic names and proportions matter: per-tensor overhead and the mix
    of a few huge matrices with many small norms is what real checkpoints look like.
    """
    hidden = 1536 if target_bytes >= (256 << 20) else 256
    inter = hidden * 8 // 3 // 64 * 64
    vocab = 32000 if hidden == 1536 else 4096
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    used = vocab * hidden * itemsize
    layer = 0
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * itemsize
    while used + per_layer <= target_bytes or layer == 0:
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
        used += per_layer
        layer += 1
    out.append(("model.norm.weight", (hidden,)))
    return tuple(out)


def small_tensor_shapes(count: int = 2000, seed: int = 7, lo: int = 64,
                        hi: int = 256 * 1024) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``count`` tensors of ``lo``..``hi`` elements, log-uniform: norms, biases, convs, small linears.

    A per-tensor overhead of even a millisecond would dominate here, which is the point.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        numel = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        kind = i % 4
        if kind == 0 or numel < 256:
            shape: tuple[int, ...] = (numel,)
        elif kind == 1:
            shape = (max(1, numel // 64), 64)
        elif kind == 2:
            c = max(1, numel // 9 // 16)
            shape = (c, 16, 3, 3)
        else:
            shape = (max(1, numel // 128), 128)
        block, j = divmod(i, 8)
        out.append((f"blocks.{block}.part{j}.weight", shape))
    return tuple(out)


def uniform_shapes(count: int, shape: tuple[int, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``count`` tensors of one shape, named as a mixture-of-experts model names its experts."""
    return tuple((f"model.layers.{i // 256}.experts.{i % 256}.weight", shape) for i in range(count))


def _tensor(spec: PairSpec, index: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, index])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))


def _moved(spec: PairSpec, index: int, a32: np.ndarray) -> np.ndarray:
    """A fine-tune step: every element nudged by ~1e-3 relative noise."""
    rng = np.random.default_rng([spec.seed, index, 1])
    return a32 + rng.standard_normal(a32.shape, dtype=np.float32) * np.float32(2e-5)


def _cast(a32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return a32
    if dtype == "bfloat16":
        import ml_dtypes
        return a32.astype(ml_dtypes.bfloat16)
    return a32.astype(np.float16)


def _pairs(spec: PairSpec) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for i, (name, shape) in enumerate(spec.shapes):
        a32 = _tensor(spec, i, shape)
        b32 = _moved(spec, i, a32) if spec.changed(i) else a32
        a = _cast(a32, spec.dtype)
        b = _cast(b32, spec.dtype) if spec.changed(i) else a
        yield name, a, b


def _write_safetensors_pair(spec: PairSpec, path_a: str, path_b: str) -> None:
    """Header first, then one tensor at a time into both files (bounded memory)."""
    code = _CODES[spec.dtype]
    item = 2 if spec.dtype in ("bfloat16", "float16") else 4
    header: dict[str, object] = {"__metadata__": {"format": "pt", "generator": "ckptdiff-bench"}}
    off = 0
    for name, shape in spec.shapes:
        n = int(np.prod(shape)) * item
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-aligned, as safetensors does
    with open(path_a + ".tmp", "wb") as fa, open(path_b + ".tmp", "wb") as fb:
        for f in (fa, fb):
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
        for _name, a, b in _pairs(spec):
            fa.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            fb.write(np.ascontiguousarray(b).reshape(-1).view(np.uint8))
    os.replace(path_a + ".tmp", path_a)
    os.replace(path_b + ".tmp", path_b)


def _write_torch_from_safetensors(src: str, dst: str) -> None:
    """The same tensors, torch.save'd (zip format): what a training script writes."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(src)
    torch.save(sd, dst + ".tmp")
    del sd
    os.replace(dst + ".tmp", dst)


def _each_tensor(src: str) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of a safetensors file, one at a time, in file order."""
    from safetensors import safe_open

    with safe_open(src, "np") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _write_shards_from_safetensors(src: str, dst: str, shards: int = 4) -> None:
    """The same tensors as a Hugging Face sharded directory (``model-0000k-of-0000n`` + index)."""
    import shutil

    from safetensors.numpy import save_file

    names = list(json.loads(_header(src)))
    names = [n for n in names if n != "__metadata__"]
    per = -(-len(names) // shards)
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map: dict[str, str] = {}
    tensors = _each_tensor(src)
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(next(tensors) for _ in names[k * per:(k + 1) * per])
        save_file(part, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update((n, file) for n in part)
        del part
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _write_h5_from_safetensors(src: str, dst: str) -> None:
    """The same tensors as HDF5 datasets (contiguous, uncompressed: Keras/h5py's default layout)."""
    import h5py

    with h5py.File(dst + ".tmp", "w") as f:
        for name, arr in _each_tensor(src):
            f.create_dataset(name, data=arr)
    os.replace(dst + ".tmp", dst)


def _header(path: str) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(n)


#: Formats a spec can ask for beside safetensors: file suffix and writer (from the safetensors file).
_DERIVED = {"pt": (".pt", _write_torch_from_safetensors),
            "shards4": (".shards", _write_shards_from_safetensors),
            "h5": (".h5", _write_h5_from_safetensors)}


@dataclass
class Pair:
    spec: PairSpec
    a: str
    b: str
    fmt: str

    @property
    def label(self) -> str:
        return f"{self.spec.name} ({self.fmt})"


def ensure(spec: PairSpec, data_dir: str, log=print) -> list[Pair]:  # noqa: ANN001
    """Generate the pair (and its .pt twin) unless an up-to-date copy is there."""
    os.makedirs(data_dir, exist_ok=True)
    base = os.path.join(data_dir, spec.name)
    stamp_path = base + ".stamp.json"
    sa, sb = base + ".a.safetensors", base + ".b.safetensors"
    derived = {fmt: (base + ".a" + _DERIVED[fmt][0], base + ".b" + _DERIVED[fmt][0])
               for fmt in spec.formats if fmt in _DERIVED}
    want = spec.stamp()
    files = [sa, sb] + [p for pair in derived.values() for p in pair]
    fresh = os.path.exists(stamp_path) and open(stamp_path).read() == want and all(map(os.path.exists, files))
    if not fresh:
        if os.path.exists(stamp_path):
            os.remove(stamp_path)
        log(f"generating {spec.name}: {len(spec.shapes)} tensors, {spec.nbytes / 2**20:.0f} MiB a side ...")
        _write_safetensors_pair(spec, sa, sb)
        for fmt, (da, db) in derived.items():
            _DERIVED[fmt][1](sa, da)
            _DERIVED[fmt][1](sb, db)
        with open(stamp_path, "w") as f:
            f.write(want)
    pairs = [Pair(spec, sa, sb, "safetensors")] if "safetensors" in spec.formats else []
    pairs += [Pair(spec, da, db, fmt) for fmt, (da, db) in derived.items()]
    return pairs


def pair_info(pair: Pair) -> dict[str, object]:
    """What the benchmark process needs to know, as JSON (it never imports numpy)."""
    spec = pair.spec
    return {
        "name": spec.name, "fmt": pair.fmt, "a": pair.a, "b": pair.b, "bytes_per_side": spec.nbytes,
        "tensors": len(spec.shapes), "changed": sum(spec.changed(i) for i in range(len(spec.shapes))),
        "dtype": spec.dtype,
    }


def specs(quick: bool = False, big: bool = False) -> list[PairSpec]:
    """The benchmark's pairs. ``quick``: ~1/16 the size, for a smoke run."""
    gb = 1 << 30
    main = gb // 16 if quick else gb
    out = [
        # Two tensors: what ckptdiff costs before it reads any data (interpreter, imports, I/O setup).
        PairSpec("tiny", "float32", (("w", (16,)), ("b", (4,))), change_every=2),
        PairSpec("fp32_1g" if not quick else "fp32_quick", "float32",
                 transformer_shapes(main, 4), formats=("safetensors", "pt", "shards4")),
        PairSpec("bf16" if not quick else "bf16_quick", "bfloat16", transformer_shapes(main, 4)),
        # The many-small-tensors model: 2,000 tensors of 1 KiB..4 MiB (log-uniform), ~1 GB a
        # side like fp32_1g, so the two differ only in how the bytes are cut up.
        PairSpec("small2000" if not quick else "small_quick", "float32",
                 small_tensor_shapes(2000, lo=256, hi=1 << 20) if not quick else small_tensor_shapes(300)),
    ]
    # Cost per tensor, not per file: many tensors, few bytes each.
    out += [
        # 50,000 tensors, 512 MiB a side (mixture-of-experts, per-head tensors); --quick: 5,000 and 32 MiB.
        PairSpec("many50k" if not quick else "many5k_quick", "float32",
                 uniform_shapes(50_000 if not quick else 5_000, (22, 122) if not quick else (16, 106))),
        # 200,000 tensors of 16 floats (a 13 MiB file): per-tensor cost and nothing else.
        PairSpec("tiny200k" if not quick else "tiny20k_quick", "float32",
                 uniform_shapes(200_000 if not quick else 20_000, (16,))),
        # 2,000 tensors of 51 KiB (100 MiB a side).
        PairSpec("small51k" if not quick else "small51k_quick", "float32",
                 uniform_shapes(2_000 if not quick else 500, (102, 128))),
        # The HDF5 reader at the read floor: a 768 MiB LM as .h5 (--quick: 48 MiB).
        PairSpec("lm_h5" if not quick else "lm_h5_quick", "float32",
                 transformer_shapes(768 << 20 if not quick else 48 << 20, 4), formats=("h5",)),
    ]
    if not quick:
        # The first spec of the small model (256 B..1 MiB, 238 MiB a side): the floor is
        # ~0.04 s there, less than Python and numpy take to start, so it is reported, not judged.
        out.append(PairSpec("small2000_lite", "float32", small_tensor_shapes(2000)))
    if big:
        out.append(PairSpec("fp32_2g", "float32", transformer_shapes(2 * gb, 4), seed=99))
    return out


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the pairs and print them as JSON lines.

    Run as its own process by bench_diff.py so that the benchmark process
    stays small: Linux counts the parent's resident pages into a vfork()ed
    child's peak RSS, which would inflate every measured tool.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--data", required=True)
    args = ap.parse_args(argv)
    for spec in specs(quick=args.quick, big=args.big):
        for pair in ensure(spec, args.data, log=lambda m: print(m, file=sys.stderr, flush=True)):
            print(json.dumps(pair_info(pair)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
