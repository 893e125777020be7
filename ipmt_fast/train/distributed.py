"""Process-group helpers for ``torchrun`` training: NCCL on GPUs, gloo on CPUs, rank 0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = None) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or describe a single process.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) defaults to this rank's GPU when CUDA is
    available, else the CPU. CPU ranks on one machine share its cores between them.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                    rank=rank, world_size=world_size)
        if dev.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistContext(rank, world_size, local_rank, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ranks (identity in a single process)."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Tear the process group down. On a clean exit the ranks first meet at a barrier: a rank that
    destroys its group while a peer is still finishing can leave that peer waiting forever (seen
    here once with gloo, rank 0 left in a collective after rank 1 had exited). After an error there
    is no barrier to meet at, so the group is destroyed at once (the launcher ends the peers)."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            barrier()
        dist.destroy_process_group()
