"""The hook on every rank: real two-process runs (gloo on CPU) under DDP and FSDP2, plus the rank logic alone.

Each multi-process run starts two ranks with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) on a free port, under a timeout, so a hang fails the test instead of blocking it.
The ranks run ``distributed_worker.py`` and report what they saw; the store they leave is checked here.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest

import ckptdiff
from ckptdiff.cli import main as cli_main
from ckptdiff.hook import TrackerError
from ckptdiff.hook.distributed import Ranks
from ckptdiff.store import Store

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT_S = 120  # a hang fails the test; a healthy run takes seconds


def _free_port() -> int:
    """A free port below the kernel's ephemeral range.

    Between this check and rank 0 binding it, the port must not be handed out
    as anyone's ephemeral port (gloo's pair sockets in a concurrent launch
    take them by the dozen); below that range only an explicit bind takes it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, ephemeral_low - 12000), ephemeral_low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: fall back to any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, out_dir: str, world: int = 2) -> list[dict]:
    """Run ``scenario`` on ``world`` ranks as torchrun would; each rank's report."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(os.path.join(out_dir, f"log{rank}.txt"), "w")
        procs.append((subprocess.Popen([sys.executable, WORKER, scenario, out_dir], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p, _ in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join(open(os.path.join(out_dir, f"log{r}.txt")).read()[-3000:] for r in range(world))
    assert codes is not None, f"{scenario}: the ranks did not finish in {TIMEOUT_S} s (a hang):\n{logs}"
    assert codes == [0] * world, f"{scenario}: exit codes {codes}:\n{logs}"
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]


def _run_once(scenario: str, tmp_path_factory, worker_id: str) -> tuple[list[dict], str]:
    """Launch ``scenario`` once per test session, even when pytest-xdist spreads its tests over workers."""
    if worker_id == "master":  # no xdist: one process, module-scoped fixtures already run it once
        out = str(tmp_path_factory.mktemp(scenario))
        return _launch(scenario, out), os.path.join(out, "store")
    from filelock import FileLock  # a torch dependency

    shared = tmp_path_factory.getbasetemp().parent  # this pytest run's, common to its workers
    out = shared / f"distributed-{scenario}"
    with FileLock(str(shared / f"distributed-{scenario}.lock")):
        if not (out / "reports.json").exists():
            out.mkdir(exist_ok=True)
            reports = _launch(scenario, str(out))
            (out / "reports.json").write_text(json.dumps(reports))
    return json.loads((out / "reports.json").read_text()), str(out / "store")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, worker_id):
    return _run_once("ddp", tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, worker_id):
    return _run_once("fsdp", tmp_path_factory, worker_id)


def _coherent(path: str) -> list:
    """The store's history, checked to be one chain: each snapshot's parent is the one before it."""
    infos = Store.open(path).list()
    assert [i.parent for i in infos] == [None] + [i.id for i in infos[:-1]]
    steps = [i.step for i in infos]
    assert steps == sorted(steps)
    assert cli_main(["log", path]) == 0 and cli_main(["verify", path]) == 0
    return infos


@pytest.mark.distributed
def test_rank_comes_from_the_environment_before_init_process_group(ddp_run):
    reports, store = ddp_run
    assert [r["early"] for r in reports] == [{"rank": 0, "world": 2, "writes": True},
                                             {"rank": 1, "world": 2, "writes": False}]
    infos = _coherent(os.path.join(store, "early"))
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (1, None)]  # rank 0's only, not twice


@pytest.mark.distributed
def test_ddp_drift_is_caught_on_every_rank_at_the_same_step(ddp_run):
    reports, _ = ddp_run
    for rank, r in enumerate(reports):
        events = r["record"]["events"]
        assert [(e["step"], e["names"], e["ranks"]) for e in events] == [
            (3, ["0.weight"], [0, 1]), (3, ["0.bias"], [0, 1])], rank
    exact, checksum = reports[0]["record"]["events"], reports[1]["record"]["events"]
    assert [e["changed"] for e in exact] == [128, 16]  # measured against the baseline bytes by the writer
    assert all(e["snapshot"] for e in exact)
    assert [e["changed"] for e in checksum] == [None, None]  # rank 1 holds no store: its checksum's word
    assert reports[0]["record"]["writes"] and not reports[1]["record"]["writes"]


@pytest.mark.distributed
def test_ddp_replicas_that_differ_are_found_by_the_cross_rank_comparison(ddp_run):
    reports, _ = ddp_run
    for r in reports:  # rank 1's bias differed from attach on: its own check cannot see that
        assert r["record"]["divergences"] == [{"step": 2, "names": ["0.bias"], "groups": [[0], [1]]}]


@pytest.mark.distributed
def test_ddp_raise_is_collective_every_rank_raises_at_the_same_step(ddp_run):
    reports, _ = ddp_run
    assert [r["raise"]["raised_at"] for r in reports] == [7, 7]  # and both exited 0: none hung, none died
    for r in reports:
        assert [(e["step"], e["names"], e["ranks"]) for e in r["raise"]["events"]] == [(7, ["0.weight"], [1])]


@pytest.mark.distributed
def test_ddp_run_leaves_one_coherent_history_with_the_metrics_rank_said(ddp_run):
    _, store = ddp_run
    infos = _coherent(os.path.join(store, "run"))
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (2, None), (3, "drift"), (4, None),
                                                (4, "baseline"), (6, None), (7, None)]
    assert infos[1].metrics == {"loss": 2.0, "metrics_rank": 0}  # rank 0's own value (rank r logs r + step)
    assert infos[5].metrics == {"loss": 6.5, "metrics_mean_of_ranks": 2}  # metrics_reduce="mean"


@pytest.mark.distributed
def test_ddp_rank0_only_false_keeps_one_chain_per_rank(ddp_run):
    reports, store = ddp_run
    for rank, r in enumerate(reports):
        assert r["per_rank"] == {"store": os.path.join(store, f"rank{rank}"), "writes": True}
        infos = _coherent(r["per_rank"]["store"])
        assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (2, None)]
        assert infos[1].metrics == {"loss": rank + 10.0, "metrics_rank": rank}  # this rank's own values


@pytest.mark.distributed
def test_fsdp2_drift_is_caught_on_every_rank_and_raised_together(fsdp_run):
    reports, _ = fsdp_run
    assert [r["raised_at"] for r in reports] == [3, 3]
    for r in reports:
        assert [(e["step"], e["names"], e["ranks"]) for e in r["events"]] == [(3, ["0.weight"], [0, 1]),
                                                                            (3, ["0.bias"], [0, 1])]
        assert r["local_shape"] == [8, 8]  # each rank checked its own half of the 16x8 weight
    assert [e["changed"] for e in reports[0]["events"]] == [128, 16]  # the whole tensor, gathered


@pytest.mark.distributed
def test_fsdp2_history_holds_the_full_tensors(fsdp_run):
    reports, store = fsdp_run
    infos = _coherent(store)
    assert [(i.step, i.tag) for i in infos] == [(0, "baseline"), (2, None), (3, "drift"), (4, None)]
    assert infos[-1].id == reports[0]["last"]
    snap = Store.open(store).open_snapshot(infos[-1].id)
    full = reports[0]["full"]
    assert sorted(snap) == sorted(full)
    for name, values in full.items():
        np.testing.assert_array_equal(snap[name].numpy(), np.asarray(values, dtype=np.float32))


def test_ranks_come_from_torchrun_environment_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Ranks.detect() == Ranks(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(TrackerError, match="RANK=4 and WORLD_SIZE=4"):
        Ranks.detect()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(TrackerError, match="RANK='one' is not an integer"):
        Ranks.detect()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert Ranks.detect() == Ranks(0, 1, 0)


def test_rank0_only_false_needs_one_store_per_rank(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 2)
    shared = str(tmp_path / "runs")
    with pytest.raises(TrackerError, match=r"interleave every rank's snapshots.*rank\{rank\}"):
        ckptdiff.track(model, store=shared, rank0_only=False)
    assert not os.path.exists(shared)
    with ckptdiff.track(model, store=str(tmp_path / "runs" / "rank{rank}"), rank0_only=False) as tracker:
        assert tracker.writes and tracker.store_path == str(tmp_path / "runs" / "rank1")
    assert [i.tag for i in Store.open(str(tmp_path / "runs" / "rank1")).list()] == ["baseline"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_wrapped_models_and_optimizers_are_accepted_as_they_are(tmp_path):
    class Prepared:  # accelerate's AcceleratedOptimizer, duck-typed: not an Optimizer, holds one
        def __init__(self, inner):
            self.optimizer = inner

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    compiled = torch.compile(model)  # wrapping costs nothing until the first call
    with ckptdiff.track(compiled, Prepared(opt), store=str(tmp_path / "s"), audit=False) as tracker:
        assert tracker.optimizer is opt
        assert tracker.manifest.trainable == ("1.weight", "1.bias")  # no _orig_mod. prefix
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        assert tracker.current_step == 1
