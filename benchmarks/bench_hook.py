"""Overhead of the training hook on a small transformer fine-tune, measured side by side in one process.

    .venv/bin/python benchmarks/bench_hook.py               # CPU (and CUDA when available)
    .venv/bin/python benchmarks/bench_hook.py --steps 400 --json out.json

Three copies of the same model (same initial weights, same batches, same
optimizer) train in one process: ``plain`` and ``control`` without the hook
and ``hooked`` with ``ckptdiff.track(model, opt, every=50, check_every=1)``.
Steps are interleaved in short blocks, rotating which copy goes first, so
background load hits all three alike. Every step is timed. The headline is
the *paired* ratio: per round, hooked's block median over plain's, then the
median over rounds (the two blocks run seconds apart, so slow load drift
cancels). ``control``/``plain`` is the same ratio between two identical
un-hooked copies: the noise floor of the machine. The mean ratio includes the
periodic snapshot steps (capture + the writer thread sharing the cores).

A second table times the drift-check strategies on the same frozen tensors
(what ``check_every=1`` costs per step): the version filter alone, the
filter plus the rotating checksum backstop (the hook's default), a full
on-device checksum of every frozen tensor, and the naive alternative of
copying every frozen tensor to host and comparing it with a host baseline.

Targets: <= 3% overhead on CPU at every=50, check_every=1; <= 1% on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import ckptdiff
from ckptdiff.hook import DriftWarning
from ckptdiff.hook.fingerprint import FrozenWatch
from ckptdiff.hook.model import collect


class TinyLM(nn.Module):
    """Embedding -> N transformer encoder layers -> classifier: a BERT-style fine-tune target."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(512, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx) + self.pos[: idx.shape[1]]
        return self.head(self.norm(self.encoder(h)).mean(1))


def build(seed: int, args: argparse.Namespace, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM(args.vocab, args.d_model, args.layers, args.heads).to(device)
    # Selective fine-tune: freeze the embeddings and all but the last `--train-layers` layers.
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.encoder.layers[-args.train_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for p in list(model.norm.parameters()) + list(model.head.parameters()):
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def batches(args: argparse.Namespace, device: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device),
             torch.randint(0, 4, (args.batch,), generator=g).to(device)) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def run_overhead(args: argparse.Namespace, device: str) -> dict[str, object]:
    plain, opt_p = build(0, args, device)
    control, opt_c = build(0, args, device)  # a second plain copy: the A/A noise floor
    hooked, opt_h = build(0, args, device)
    data = batches(args, device, 16)
    for i in range(args.warmup):
        for m, o in ((plain, opt_p), (control, opt_c), (hooked, opt_h)):
            one_step(m, o, *data[i % len(data)])
    sync(device)
    store = tempfile.mkdtemp(prefix="bench_hook_")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)  # a clean fine-tune must not warn
        t_attach = time.perf_counter()
        tracker = ckptdiff.track(hooked, opt_h, store=os.path.join(store, "run"), every=args.every,
                                 check_every=args.check_every)
        t_attach = time.perf_counter() - t_attach
        times: dict[str, list[float]] = {"plain": [], "control": [], "hooked": []}
        rounds: list[dict[str, float]] = []
        order = [("plain", plain, opt_p), ("control", control, opt_c), ("hooked", hooked, opt_h)]
        step = 0
        while step < args.steps:
            block: dict[str, float] = {}
            for name, model, opt in order:
                ts = []
                for k in range(args.block):
                    x, y = data[(step + k) % len(data)]
                    t0 = time.perf_counter()
                    loss = one_step(model, opt, x, y)
                    if name == "hooked":
                        tracker.log(loss=loss)
                    sync(device)
                    ts.append(time.perf_counter() - t0)
                times[name] += ts
                block[name] = statistics.median(ts)
            rounds.append(block)
            order = order[1:] + order[:1]  # rotate who goes first
            step += args.block
        t_close = time.perf_counter()
        tracker.close()
        t_close = time.perf_counter() - t_close
    stats = tracker.stats
    # Same math, same data: the hook must not change the training itself.
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), hooked.state_dict().values()))
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in hooked.parameters())
    n_train = sum(p.numel() for p in hooked.parameters() if p.requires_grad)
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "params": n_params,
        "trainable_params": n_train,
        "steps_each": len(times["plain"]),
        "every": args.every,
        "check_every": args.check_every,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "mean_ms": {k: v * 1e3 for k, v in mean.items()},
        # Per round, the two block medians are measured seconds apart: their ratio cancels slow load drift.
        "paired_ratio": statistics.median(r["hooked"] / r["plain"] for r in rounds),
        "control_paired_ratio": statistics.median(r["control"] / r["plain"] for r in rounds),
        "median_ratio": med["hooked"] / med["plain"],
        "mean_ratio": mean["hooked"] / mean["plain"],
        "control_mean_ratio": mean["control"] / mean["plain"],
        "attach_s": t_attach,
        "close_s": t_close,
        "hook_ms_per_step": stats["hook_seconds"] / max(1, stats["steps"]) * 1e3,
        "writer_stall_s": stats["writer_stall_seconds"],
        "snapshots": stats["snapshots_written"],
        "staging_bytes": stats["staging_bytes"],
        "drift_events": len(tracker.drift_events),
        "identical_weights": same,
    }


def run_check_strategies(args: argparse.Namespace, device: str) -> dict[str, float]:
    """Per-check cost (µs) of each drift-check strategy on the benchmark's frozen tensors."""
    model, opt = build(0, args, device)
    tracker_like = collect(model, optimizer_ids={id(p) for g in opt.param_groups
                                                                     for p in g["params"]})
    frozen = tracker_like.role_slots("frozen")
    reps = args.check_reps

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps * 1e6

    w_filter = FrozenWatch(frozen, backstop_groups=1)
    w_filter.set_baseline()
    w_rot = FrozenWatch(frozen, backstop_groups=args.every)
    w_rot.set_baseline()
    w_full = FrozenWatch(frozen, backstop_groups=1)
    w_full.set_baseline()
    host_base = [s.tensor.detach().cpu().clone() for s in frozen]

    def naive() -> None:
        for s, b in zip(frozen, host_base):
            if not torch.equal(s.tensor.detach().cpu(), b):
                raise AssertionError("frozen tensor moved")

    out = {
        "version_filter_us": timed(lambda: w_filter.suspects()),
        "filter_plus_rotating_backstop_us": timed(
            lambda: (p := w_rot.launch(0)) is not None and w_rot.collect(p)),
        "full_checksum_us": timed(lambda: w_full.collect(w_full.launch(0, everything=True))),
        "naive_host_copy_compare_us": timed(naive),
        "frozen_tensors": len(frozen),
        "frozen_bytes": sum(s.nbytes for s in frozen),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="timed steps per model (default 300)")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block (default 5)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--check-every", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--train-layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--check-reps", type=int, default=200)
    ap.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine a descheduled worker thread stalls "
                         "every op, which swamps the effect being measured)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    results = {"torch": torch.__version__, "python": sys.version.split()[0], "runs": []}
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: not available, skipped")
            continue
        over = run_overhead(args, device)
        checks = run_check_strategies(args, device)
        results["runs"].append({"overhead": over, "checks": checks})
        target = 1.01 if device.startswith("cuda") else 1.03
        print(f"\n== {device} ({over['torch_threads']} torch threads): {over['params'] / 1e6:.2f}M params, "
              f"{over['trainable_params'] / 1e6:.2f}M trainable, {over['steps_each']} steps each, "
              f"every={over['every']}, check_every={over['check_every']}")
        print(f"{'':10}{'median ms':>12}{'mean ms':>12}")
        for k in ("plain", "control", "hooked"):
            print(f"{k:10}{over['median_ms'][k]:12.3f}{over['mean_ms'][k]:12.3f}")
        pr = over["paired_ratio"]
        verdict = "meets" if pr <= target else "MISSES"
        print(f"hooked/plain: paired {pr:.4f} ({(pr - 1) * 100:+.2f}%), medians {over['median_ratio']:.4f}, "
              f"means {over['mean_ratio']:.4f} ({(over['mean_ratio'] - 1) * 100:+.2f}%)  -> {verdict} the "
              f"{round((target - 1) * 100)}% target")
        print(f"control/plain (A/A noise floor): paired {over['control_paired_ratio']:.4f}, means "
              f"{over['control_mean_ratio']:.4f}")
        print(f"hook on the training thread: {over['hook_ms_per_step']:.3f} ms/step; snapshots written: "
              f"{over['snapshots']}; writer stalls: {over['writer_stall_s']:.3f} s; staging: "
              f"{over['staging_bytes'] / 2**20:.1f} MiB; attach {over['attach_s']:.2f} s, close "
              f"{over['close_s']:.2f} s; drift events: {over['drift_events']}; weights identical to plain: "
              f"{over['identical_weights']}")
        print(f"drift check per step on {checks['frozen_tensors']} frozen tensors "
              f"({checks['frozen_bytes'] / 2**20:.1f} MiB):")
        base = checks["naive_host_copy_compare_us"]
        for k in ("version_filter_us", "filter_plus_rotating_backstop_us", "full_checksum_us",
                  "naive_host_copy_compare_us"):
            print(f"  {k[:-3]:34}{checks[k]:10.1f} µs   {checks[k] / base:8.4f}x naive   "
                  f"{checks[k] / 1e3 / over['median_ms']['plain'] * 100:7.3f}% of a step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
