"""Which rank this process is, and the few collectives that keep every rank's hook in step.

Under ``torchrun`` the hook runs on every rank. Rank 0 writes the history
(``rank0_only=True``, the default); every rank checks its own tensors for
drift (a DDP replica, or an FSDP2 rank's local shards). Decisions that change
control flow are taken together, so no rank raises, gathers or waits alone:

* which frozen tensors drifted: each rank's verdict is all-gathered, and every
  rank reports the union at the same step (``on_drift="raise"`` raises on all
  ranks at once, instead of one rank dying and the others hanging);
* which sharded tensors a snapshot gathers: the union of every rank's choice,
  then ``full_tensor()`` for each, in index order, on every rank;
* replica checksums (``replica_check_every``) and mean metrics
  (``metrics_reduce="mean"``), when asked for.

Before ``init_process_group`` the rank comes from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so rank 1 does not believe it is
rank 0; collectives start once the process group exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .model import TrackerError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (0 of 1 outside torch.distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def detect(cls) -> Ranks:
        """From the initialized process group, else from torchrun's environment variables."""
        dist = _dist()
        if dist is not None and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            return cls(rank, world, _env_int("LOCAL_RANK", rank))
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise TrackerError(f"RANK={rank} and WORLD_SIZE={world} in the environment do not describe a rank of "
                               "a job (0 <= RANK < WORLD_SIZE)")
        return cls(rank, world, _env_int("LOCAL_RANK", rank))

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def store_path(self, path: str, *, rank0_only: bool) -> str:
        """The store this rank writes: ``{rank}`` in the path is replaced; one shared store needs rank0_only."""
        if not rank0_only and self.world > 1 and "{rank}" not in path:
            raise TrackerError(
                f"rank0_only=False on {self.world} ranks would interleave every rank's snapshots in one history; "
                f"give each rank its own store with {{rank}} in the path (store='{path.rstrip('/')}/rank{{rank}}'), "
                "or keep rank0_only=True (rank 0 writes, every rank still checks drift)")
        return path.replace("{rank}", str(self.rank))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise TrackerError(f"environment variable {name}={raw!r} is not an integer") from None


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - builds without distributed
        return None
    return dist if dist.is_available() else None


class Collectives:
    """The hook's collectives; in a single process (or before the group exists) each is the local answer."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._solo = False

    def solo(self) -> None:
        """From now on, talk to no other rank (closing at exit, or after an error only this rank saw)."""
        self._solo = True

    @property
    def ready(self) -> bool:
        """Several ranks and a process group to talk through."""
        if self.ranks.world < 2 or self._solo:
            return False
        dist = _dist()
        return dist is not None and dist.is_initialized()

    def _device(self) -> Any:
        import torch

        backend = str(_dist().get_backend())
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def flags_by_rank(self, n: int, mine: Iterable[int]) -> list[set[int]]:
        """Every rank's set of flagged indices in ``range(n)`` (this rank's ``mine`` alone when not ready)."""
        mine = set(mine)
        if not self.ready:
            return [mine]
        import torch

        dist = _dist()
        mask = torch.zeros(max(n, 1), dtype=torch.uint8, device=self._device())
        if mine:
            mask[sorted(mine)] = 1
        rows = [torch.empty_like(mask) for _ in range(self.ranks.world)]
        dist.all_gather(rows, mask)
        return [set(torch.nonzero(r[:n]).flatten().tolist()) for r in rows]

    def union(self, n: int, mine: Iterable[int]) -> list[int]:
        """Indices in ``range(n)`` flagged by any rank, sorted."""
        return sorted(set().union(*self.flags_by_rank(n, mine)))

    def with_agreed(self, chosen: Sequence[int], sharded: Sequence[int]) -> list[int]:
        """``chosen`` plus every sharded index any rank chose: the gathers all ranks make, in order."""
        if not self.ready:
            raise TrackerError("sharded tensors can only be gathered while every rank takes part "
                               "(call close() on every rank before the process group ends)")
        pos = {i: k for k, i in enumerate(sharded)}
        wanted = self.union(len(sharded), [pos[i] for i in chosen if i in pos])
        return sorted(set(chosen) | {sharded[k] for k in wanted})

    def checksums_by_rank(self, sums: Any) -> list[list[int]]:
        """Every rank's int64 vector of checksums (this rank's alone when not ready)."""
        if not self.ready:
            return [sums.tolist()]
        import torch

        dist = _dist()
        mine = sums.to(self._device())
        rows = [torch.empty_like(mine) for _ in range(self.ranks.world)]
        dist.all_gather(rows, mine)
        return [r.tolist() for r in rows]

    def objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, picklable; produced by the hook itself on each rank)."""
        if not self.ready:
            return [obj]
        out: list[Any] = [None] * self.ranks.world
        _dist().all_gather_object(out, obj)
        return out


def whole(slot: Any) -> Any:
    """A sharded slot's full tensor (``DTensor.full_tensor()``: a collective every rank must call)."""
    import torch

    with torch.no_grad():
        return slot.tensor.full_tensor()


__all__ = ["Ranks", "Collectives", "whole"]
