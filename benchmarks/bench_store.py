"""Snapshot store benchmarks, each side by side with its alternative in one run.

    .venv/bin/python benchmarks/bench_store.py            # full run (~1-2 min, ~2 GB of temp disk)
    .venv/bin/python benchmarks/bench_store.py --quick    # smaller sizes, a smoke test

1. Dedupe: 50 snapshots of a model whose trainable tensors are 2% of its
   bytes. Target: store size (blobs + database) <= 1.05 x (one full copy +
   50 x the trainable bytes), uncompressed. The alternative shown is 50 plain
   safetensors files.
2. Compression: fp32 and bf16 "real-looking" weights (normal, per-layer
   scales), stored size / raw size with the byte-plane filter, next to plain
   zstd at the same level (1) without it.
3. Write throughput: snapshotting fresh bytes into a store vs writing the same
   bytes as one plain file (both fsynced). Target: >= 50%.

Numbers are ratios measured in this process, so they compare like with like
on whatever disk runs them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ckptdiff.checkpoint import Checkpoint  # noqa: E402
from ckptdiff.store import Store  # noqa: E402

from _measure import cpu_model  # noqa: E402  (this folder: the script's own)

MiB = 1 << 20


def tree_bytes(path: str) -> int:
    total = 0
    for d, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(d, n))
    return total


def real_looking(rng: np.random.Generator, n_bytes: int, dtype: object, layers: int = 16) -> dict[str, np.ndarray]:
    """Normal weights with a different scale per layer, like a trained transformer's."""
    itemsize = np.dtype(dtype).itemsize
    per = n_bytes // layers // itemsize
    width = 1024
    rows = max(1, per // width)
    return {f"layers.{i}.weight": (rng.standard_normal((rows, width), dtype=np.float32)
                                   * np.float32(0.02 * (0.5 + i / layers))).astype(dtype)
            for i in range(layers)}


def bench_dedupe(work: str, model_mb: int, n: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    frozen = real_looking(rng, int(model_mb * MiB * 0.98), np.float32, layers=24)
    train_elems = int(model_mb * MiB * 0.02) // 4 // 2
    trainable = {"lora.A": rng.standard_normal(train_elems, dtype=np.float32),
                 "lora.B": rng.standard_normal(train_elems, dtype=np.float32)}
    full = sum(a.nbytes for a in frozen.values()) + sum(a.nbytes for a in trainable.values())
    train_bytes = sum(a.nbytes for a in trainable.values())
    root = os.path.join(work, "dedupe")
    t0 = time.perf_counter()
    with Store.init(root) as s:
        for step in range(n):
            trainable = {k: v + np.float32(1e-3) for k, v in trainable.items()}
            s.snapshot(Checkpoint.from_arrays({**frozen, **trainable}), step=step, metrics={"loss": 1.0 / (step + 1)})
        blobs = s.disk_usage()
    elapsed = time.perf_counter() - t0
    on_disk = tree_bytes(root)
    bound = full + n * train_bytes
    shutil.rmtree(root)
    return {"model_bytes": full, "trainable_bytes": train_bytes, "trainable_pct": 100 * train_bytes / full,
            "snapshots": n, "store_bytes": on_disk, "blob_bytes": blobs, "bound_bytes": bound,
            "ratio_to_bound": on_disk / bound, "plain_copies_bytes": n * full, "seconds": elapsed}


def bench_compression(work: str, mb: int) -> list[dict[str, float | str]]:
    import zstandard

    out = []
    for name, dtype in (("fp32", np.float32), ("bf16", ml_dtypes.bfloat16)):
        sd = real_looking(np.random.default_rng(1), mb * MiB, dtype)
        raw = sum(a.nbytes for a in sd.values())
        root = os.path.join(work, f"z-{name}")
        with Store.init(root, compress=True) as s:
            t0 = time.perf_counter()
            s.snapshot(Checkpoint.from_arrays(sd))
            secs = time.perf_counter() - t0
            stored = s.disk_usage()
        shutil.rmtree(root)
        cctx = zstandard.ZstdCompressor(level=1)
        plain = 0
        for a in sd.values():
            b = a.tobytes()
            for i in range(0, len(b), 4 * MiB):
                plain += min(len(cctx.compress(b[i:i + 4 * MiB])), len(b[i:i + 4 * MiB]))
        out.append({"dtype": name, "raw_bytes": raw, "stored_bytes": stored, "ratio": stored / raw,
                    "plain_zstd_ratio": plain / raw, "write_MBps": raw / MiB / secs})
    return out


def bench_throughput(work: str, mb: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(2)
    sd = real_looking(rng, mb * MiB, np.float32, layers=32)
    raw = sum(a.nbytes for a in sd.values())
    ckpt = Checkpoint.from_arrays(sd)
    plain_t, store_t = [], []
    for r in range(repeats):
        # plain: one file, every byte written, fsynced
        p = os.path.join(work, f"plain-{r}.bin")
        t0 = time.perf_counter()
        with open(p, "wb") as f:
            for a in sd.values():
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        plain_t.append(time.perf_counter() - t0)
        os.unlink(p)
        root = os.path.join(work, f"tp-{r}")
        with Store.init(root) as s:
            t0 = time.perf_counter()
            s.snapshot(ckpt)
            store_t.append(time.perf_counter() - t0)
        shutil.rmtree(root)
    plain, store = statistics.median(plain_t), statistics.median(store_t)
    return {"bytes": raw, "plain_MBps": raw / MiB / plain, "store_MBps": raw / MiB / store,
            "ratio": plain / store, "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not the reported numbers)")
    ap.add_argument("--dir", help="where to write (default: a temp dir; use the disk you care about)")
    args = ap.parse_args(argv)
    model_mb, n, comp_mb, tp_mb, reps = (16, 10, 16, 32, 2) if args.quick else (128, 50, 64, 512, 3)
    work = tempfile.mkdtemp(prefix="ckptdiff-bench-", dir=args.dir)
    try:
        d = bench_dedupe(work, model_mb, n)
        c = bench_compression(work, comp_mb)
        t = bench_throughput(work, tp_mb, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = lambda b: f"{b / MiB:,.1f} MiB"  # noqa: E731
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs")
    print(f"1. dedupe: {d['snapshots']} snapshots of a {mb(d['model_bytes'])} model, "
          f"{d['trainable_pct']:.1f}% trainable ({mb(d['trainable_bytes'])} per snapshot)")
    print(f"   {'store on disk (blobs + db)':<34} {mb(d['store_bytes']):>14}")
    print(f"   {'bound: 1 copy + N x trainable':<34} {mb(d['bound_bytes']):>14}")
    print(f"   {'alternative: N plain copies':<34} {mb(d['plain_copies_bytes']):>14}")
    print(f"   ratio store / bound = {d['ratio_to_bound']:.4f}  (target <= 1.05)   "
          f"store / plain copies = {d['store_bytes'] / d['plain_copies_bytes']:.4f}   "
          f"({d['seconds']:.1f} s for {d['snapshots']} snapshots)")
    print("\n2. compression (zstd level 1, 4 MiB frames), stored / raw:")
    print(f"   {'dtype':<6} {'raw':>12} {'stored':>12} {'byte planes':>12} {'plain zstd':>11} {'write':>11}")
    for r in c:
        print(f"   {r['dtype']:<6} {mb(r['raw_bytes']):>12} {mb(r['stored_bytes']):>12} {r['ratio']:>12.3f} "
              f"{r['plain_zstd_ratio']:>11.3f} {r['write_MBps']:>6.0f} MiB/s")
    print(f"\n3. write throughput, {mb(t['bytes'])} of fresh fp32 weights, median of {t['repeats']}, both fsynced:")
    print(f"   plain file {t['plain_MBps']:,.0f} MiB/s   store snapshot {t['store_MBps']:,.0f} MiB/s   "
          f"ratio {t['ratio']:.2f}  (target >= 0.50)")
    ok = d["ratio_to_bound"] <= 1.05 and t["ratio"] >= 0.5
    print("\nall targets met" if ok else "\nTARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
