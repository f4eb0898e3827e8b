"""Differential tests: ckptdiff reads what torch / safetensors load, or refuses the file.

Real ``torch.save`` and ``safetensors`` outputs (flat state_dicts of every
dtype incl. bf16/fp8, nested training checkpoints with optimizer state, zip
and legacy) are mutated by hypothesis; for each mutant ckptdiff must either
refuse it or produce exactly the reference library's tensors. The suite runs
a few dozen mutants per seed; ``benchmarks/fuzz_readers.py --examples N``
runs as many as asked.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

from hostile_helpers import run_cli  # noqa: E402
from reader_oracles import fuzz_one, make_seeds, same_as_reference  # noqa: E402

SEEDS = ("flat.pt", "flat-legacy.pt", "training.pt", "training-legacy.pt", "flat.safetensors")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, str]:
    return make_seeds(str(tmp_path_factory.mktemp("seeds")))


@pytest.mark.parametrize("name", SEEDS)
def test_unmutated_files_read_exactly_as_the_reference(seeds, name):
    assert same_as_reference(seeds[name])


@pytest.mark.parametrize("name", SEEDS)
def test_mutants_are_refused_or_read_exactly_as_the_reference(seeds, tmp_path_factory, name):
    out = str(tmp_path_factory.mktemp("mutants") / f"m-{name}")

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(seed=st.integers(0, 2 ** 32 - 1))
    def one(seed: int) -> None:
        fuzz_one(seeds[name], out, seed)  # raises Disagreement on any difference

    one()


def test_mutants_through_the_cli_exit_0_or_one_line_and_2(seeds, tmp_path):
    for i, name in enumerate(("flat.pt", "flat.safetensors")):
        out = str(tmp_path / f"cli-{name}")
        outcome = fuzz_one(seeds[name], out, 1000 + i)
        run = run_cli("diff", out, out)
        if outcome == "refused":
            run.refused()
        else:
            assert run.rc == 0 and run.stderr == "", (name, run.stderr)
    assert os.listdir(tmp_path)
