"""One rank of a real multi-process training run (gloo, CPU), started by test_distributed.py.

Usage: python distributed_worker.py {ddp|fsdp} OUT_DIR, with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each rank writes what it saw to OUT_DIR/rank{RANK}.json; the test
asserts on those and on the store the run left behind.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import ckptdiff
from ckptdiff.hook import FrozenDriftError

torch.set_num_threads(1)
warnings.simplefilter("ignore")  # the audit rightly warns about frozen tensors in AdamW: that is the point here

DRIFT_STEP = 3  # the step at which the frozen backbone gets zero grads (AdamW's decay then moves it)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)  # the frozen backbone
    return model


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, frozen: list[nn.Parameter], rank: int, step: int,
           tracker: ckptdiff.Tracker) -> None:
    x, y = _batch(rank, step)
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    if step == DRIFT_STEP:
        for p in frozen:  # the classic mistake: a zero tensor instead of None lets AdamW decay frozen weights
            p.grad = torch.zeros_like(p)
    opt.step()
    tracker.log(loss=float(rank + step))


def _run(model: nn.Module, opt: torch.optim.Optimizer, frozen: list[nn.Parameter], rank: int, steps: int,
         tracker: ckptdiff.Tracker, first_step: int = 1) -> int | None:
    """Train; the step at which a FrozenDriftError came out of optimizer.step(), if one did."""
    for step in range(first_step, first_step + steps):
        try:
            _train(model, opt, frozen, rank, step, tracker)
        except FrozenDriftError:
            return step
    return None


def _events(tracker: ckptdiff.Tracker) -> list[dict[str, object]]:
    return [e.to_dict() for e in tracker.drift_events]


def ddp(out: dict[str, object], store: str) -> None:
    rank = int(os.environ["RANK"])
    # Before init_process_group: the rank comes from the environment, and only rank 0 writes.
    early = ckptdiff.track(_model(), store=os.path.join(store, "early"), every=1)
    out["early"] = {"rank": early.ranks.rank, "world": early.ranks.world, "writes": early.writes}
    early.step()
    early.close()

    dist.init_process_group("gloo")
    model = nn.parallel.DistributedDataParallel(_model())
    frozen = list(model.module[0].parameters())
    if rank == 1:  # a replica that differs from the start: only the cross-rank comparison can see it
        with torch.no_grad():
            model.module[0].bias[0] += 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    run = os.path.join(store, "run")
    tracker = ckptdiff.track(model, opt, store=run, every=2, on_drift="record", replica_check_every=2)
    _run(model, opt, frozen, rank, 4, tracker)
    tracker.close()
    out["record"] = {"events": _events(tracker), "writes": tracker.writes,
                     "divergences": [{"step": d.step, "names": list(d.names), "groups": [list(g) for g in d.groups]}
                                     for d in tracker.replica_divergences]}

    # Collective raise: only rank 1's replica moves, yet every rank raises at the same step.
    tracker = ckptdiff.track(model, opt, store=run, every=2, on_drift="raise", metrics_reduce="mean")
    raised = None
    for step in range(5, 9):
        if step == 7 and rank == 1:
            with torch.no_grad():
                model.module[0].weight[0, 0] += 0.5
        try:
            _train(model, opt, [], rank, step, tracker)
        except FrozenDriftError:
            raised = tracker.current_step
            break
    tracker.close()
    out["raise"] = {"raised_at": raised, "events": _events(tracker)}

    # rank0_only=False: every rank writes its own history, one chain per rank.
    tracker = ckptdiff.track(model, opt, store=os.path.join(store, "rank{rank}"), every=2, rank0_only=False)
    _run(model, opt, [], rank, 2, tracker, first_step=9)
    tracker.close()
    out["per_rank"] = {"store": tracker.store_path, "writes": tracker.writes}
    dist.barrier()
    dist.destroy_process_group()


def fsdp(out: dict[str, object], store: str) -> None:
    from torch.distributed.fsdp import fully_shard

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    model = _model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    frozen = list(model[0].parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tracker = ckptdiff.track(model, opt, store=store, every=2, on_drift="raise")
    raised = _run(model, opt, frozen, rank, 5, tracker)
    _run(model, opt, [], rank, 1, tracker, first_step=raised + 1 if raised else 6)
    tracker.close()
    full = {name: p.full_tensor().tolist() for name, p in model.state_dict().items()}  # every rank gathers
    out.update(raised_at=raised, events=_events(tracker), writes=tracker.writes,
               local_shape=list(model[0].weight.to_local().shape), full=full if rank == 0 else None,
               last=tracker.last_snapshot_id)
    dist.destroy_process_group()


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    out: dict[str, object] = {}
    {"ddp": ddp, "fsdp": fsdp}[scenario](out, os.path.join(out_dir, "store"))
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
