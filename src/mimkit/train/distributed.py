"""Process-group set-up under ``torchrun`` and the few collective helpers the loop needs.

gloo on CPU, nccl on GPU. A plain ``python``/``mimkit`` launch is a world of one and needs no
process group.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, device=device)


def any_rank(flag: bool, world: World) -> bool:
    """True when ``flag`` is true on any rank (so every rank takes the same branch)."""
    if world.size == 1:
        return flag
    value = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def gather_objects(obj, world: World) -> list:
    """``obj`` from every rank, in rank order."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
