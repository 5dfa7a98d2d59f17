"""One run over several processes with torch.distributed: who this process is, and the few
collectives the stages use.

`rewardatlas run CONFIG --nproc N` spawns N ranks on this machine (workers/launch.py); under
`torchrun` each process reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from its
environment. The backend is chosen at run time: NCCL when the run's device is CUDA (rank r on
its node's GPU LOCAL_RANK), gloo on CPU. A process that is not part of a group is rank 0 of 1,
and every helper here is then the identity: the stages call them unconditionally.

What each stage shares (README, "Several processes"): collection's forwards and the analysis
pass's batches go round-robin over the ranks; each layer's SAE trains on one rank
(workers/distributed_train.py); the measure stage's (feature, text) chunks go round-robin
(workers/measured_effects.py); rank 0 merges (workers/shard_merge.py), runs the rest and
publishes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 runs the stages nobody shares (regressions, deletion curves, analyses) while the
# others wait for its next request: a collective may wait that long. A rank that dies is
# noticed at once anyway (its connections close).
COLLECTIVE_TIMEOUT = timedelta(hours=12)

# Test-only fault injection: the rank named here raises in the analysis pass, to prove that a
# rank dying mid-run fails the whole run and publishes nothing (tests/test_distributed.py).
FAIL_RANK_FOR_TESTS = "RA_TEST_FAIL_RANK"


class RankFailure(RuntimeError):
    """A rank stopped mid-run (raised by the one that fails, or reported by the launcher)."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, index: int) -> bool:
        """Round-robin: item `index` of a shared sequence is this rank's."""
        return index % self.world == self.rank

    def owner(self, index: int) -> int:
        return index % self.world

    def device(self, device: torch.device) -> torch.device:
        """A CUDA run places each rank on its node's GPU LOCAL_RANK."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # -- collectives (the identity in a single process) ---------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` in place over all ranks (op: sum or max); returns it."""
        if self.active:
            if tensor.dtype == torch.bool:
                as_int = tensor.to(torch.int32)
                dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
                tensor.copy_(as_int.bool())
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def sum_number(self, value: float | int) -> float | int:
        if not self.active:
            return value
        dtype = torch.float64 if isinstance(value, float) else torch.int64
        total = self.all_reduce(torch.tensor([value], dtype=dtype, device=self._collective_device()))
        return type(value)(total.item())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.leader else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._collective_device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def fail_if_told(self, where: str) -> None:
        """The test-only fault injection (FAIL_RANK_FOR_TESTS)."""
        if self.active and os.environ.get(FAIL_RANK_FOR_TESTS) == str(self.rank):
            raise RankFailure(f"rank {self.rank}: failing on purpose in {where} ({FAIL_RANK_FOR_TESTS} is set)")


_SINGLE = Ranks()
_current: Ranks = _SINGLE


def current() -> Ranks:
    """This process' place in the run (rank 0 of 1 outside a process group)."""
    return _current


@contextlib.contextmanager
def solo():
    """Rank 0 alone, e.g. in the analyses only it runs: the stages inside share nothing (their
    collectives would wait for ranks that are elsewhere)."""
    global _current
    outer, _current = _current, _SINGLE
    try:
        yield
    finally:
        _current = outer


def leader_first(fn):
    """fn() on rank 0, then on the others (e.g. the demo model, built once into a shared folder)."""
    ranks = current()
    if ranks.leader:
        out = fn()
    ranks.barrier()
    if not ranks.leader:
        out = fn()
    return out


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets it, with RANK, WORLD_SIZE etc., for every process it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def backend_for(device_kind: str) -> str:
    return "nccl" if device_kind == "cuda" else "gloo"


def join(backend: str) -> Ranks:
    """Join the process group the environment describes (env:// rendezvous) and become its rank."""
    global _current
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise RankFailure(f"rank {rank}: LOCAL_RANK {local_rank}, but this node has {gpus} GPU"
                              f"{'s' if gpus != 1 else ''}: start at most {gpus} processes per node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    _current = Ranks(rank, world, local_rank)
    return _current


def leave() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = _SINGLE
