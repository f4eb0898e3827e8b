"""Differential fuzzing of the .pt and safetensors readers against torch and safetensors.

Each example mutates a real ``torch.save`` / ``safetensors`` file (flat
state_dicts of every dtype, nested training checkpoints with optimizer
state, zip and legacy) and checks the rule: ckptdiff refuses the mutant, or
the reference library loads it and ckptdiff's tensors (names, dtypes,
shapes, bytes) equal the reference's. A disagreement stops the run and keeps
the mutant for inspection.

    .venv/bin/python benchmarks/fuzz_readers.py --examples 5000
    .venv/bin/python benchmarks/fuzz_readers.py --examples 200 --seed 7 --keep /tmp/mutants

The suite runs the same check on a few dozen examples
(tests/formats/test_reader_oracles.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "formats"))

import reader_oracles  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1000, help="mutants per seed file (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="first random seed (default 0)")
    ap.add_argument("--keep", default=None, help="directory for the seed files and any disagreeing mutant")
    args = ap.parse_args(argv)

    work = args.keep or tempfile.mkdtemp(prefix="ckptdiff-fuzz-")
    seeds = reader_oracles.make_seeds(os.path.join(work, "seeds"))
    failures = 0
    for name, seed_path in sorted(seeds.items()):
        assert reader_oracles.same_as_reference(seed_path), name
        counts: collections.Counter[str] = collections.Counter()
        out = os.path.join(work, f"mutant-{name}")
        t0 = time.perf_counter()
        for i in range(args.examples):
            seed = args.seed + i
            try:
                counts[reader_oracles.fuzz_one(seed_path, out, seed)] += 1
            except reader_oracles.Disagreement as e:
                failures += 1
                kept = os.path.join(work, f"disagree-{seed}-{name}")
                shutil.copy(out, kept)
                print(f"DISAGREEMENT {name} seed {seed}: {e} (kept {kept})", flush=True)
        dt = time.perf_counter() - t0
        print(f"{name:24s} {args.examples} mutants in {dt:.1f} s: {dict(counts)}", flush=True)
    if not args.keep and not failures:
        shutil.rmtree(work, ignore_errors=True)
    print("no disagreement" if not failures else f"{failures} disagreement(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
