"""Save one small model trained one step as torch.distributed.checkpoint does under two ranks.

Run as ``python dcp_job.py OUT``: spawns two gloo ranks on CPU and writes

* ``OUT/fsdp2``: DCP of an FSDP2 (``fully_shard``) model and its AdamW state;
* ``OUT/ddp``: DCP of the same model under DDP (DCP deduplicates the replicas);
* ``OUT/fsdp2.safetensors`` / ``OUT/ddp.safetensors``: the same state, gathered whole
  on rank 0 and flattened by hand (``0.weight``, ``optim.state.0.weight.exp_avg``);
* ``OUT/tp``: a tensor split column-wise (tensor parallel, ``Shard(1)``, 6 + 5 columns)
  beside a replicated one, and ``OUT/tp.safetensors`` with both whole.

Weights and inputs are small integers times powers of two, so every rank
computes the same numbers; the files are compared with each other only, never
with constants, so nothing depends on the CPU's kernels.
"""

from __future__ import annotations

import multiprocessing
import os
import sys


def make_model():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_((torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) % 7 - 3 + i) / 8)
    return model


def train_one_step(model):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=0.125)
    x = (torch.arange(24, dtype=torch.float32).reshape(4, 6) % 5) / 4
    model(x).sum().backward()
    opt.step()
    return opt


def flatten(model_sd: dict, optim_sd: dict) -> dict:
    out = {k: v.detach().clone().contiguous() for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for k, v in state.items():
            out[f"optim.state.{fqn}.{k}"] = v.detach().clone().contiguous()
    return out


def run(rank: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    for kind in ("fsdp2", "ddp"):
        model = make_model()
        if kind == "fsdp2":
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
        else:
            model = DistributedDataParallel(model)
        opt = train_one_step(model)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, kind))
        full_m, full_o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file(flatten(full_m, full_o), os.path.join(out, f"{kind}.safetensors"))
        dist.barrier()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    whole = {"tp.weight": torch.arange(66, dtype=torch.float32).reshape(6, 11) / 4,
             "norm.weight": torch.arange(11, dtype=torch.bfloat16)}
    mesh = init_device_mesh("cpu", (2,))
    dcp.save({"model": {"tp.weight": distribute_tensor(whole["tp.weight"], mesh, [Shard(1)]),
                        "norm.weight": whole["norm.weight"]}, "step": 3},
             checkpoint_id=os.path.join(out, "tp"))
    if rank == 0:
        save_file(whole, os.path.join(out, "tp.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # Plain multiprocessing: the parent only waits, so it never pays for importing torch.
    ctx = multiprocessing.get_context("spawn")
    ranks = [ctx.Process(target=run, args=(rank, sys.argv[1])) for rank in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    for p in ranks:
        if p.exitcode is None:  # hung: fail rather than wait for the test's timeout
            p.kill()
    sys.exit(0 if [p.exitcode for p in ranks] == [0, 0] else 1)
