"""Process-group set-up under ``torchrun`` or Slurm's ``srun``, and the few collective helpers the loop needs.

gloo on CPU, nccl on GPU. A plain ``python``/``mimkit`` launch is a world of one and needs no
process group. Under ``srun`` without ``torchrun`` (one task per GPU), the rank, world size and local
rank come from Slurm's variables, the rendezvous address from the step's first node and the port from
the job id, so every task of a job finds the same one without ``scontrol``.
"""

import os
import re
from collections.abc import Mapping
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


_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
# the rendezvous port: one per job id in [15000, 30000), below Linux's ephemeral ports (32768-60999)
_PORT_BASE, _PORT_SPAN = 15000, 15000


def _expand_ranges(body: str) -> list[str]:
    """`01-03,07` -> `01 02 03 07`, keeping zero padding."""
    out = []
    for part in body.split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"bad range {part!r} in a Slurm node list")
        out += [str(n).zfill(len(first)) for n in range(int(first), int(last or first) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order, as ``scontrol show hostnames`` prints them.

    Example: ``"gpu[01-03,07],login-a[1-2]x"`` -> ``gpu01 gpu02 gpu03 gpu07 login-a1x login-a2x``;
    several bracket groups in one name expand to every combination, first group outermost.
    """
    hosts = []
    for entry in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):  # commas inside brackets do not split
        names = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", entry):
            names = [n + text for n in names]
            if ranges:
                names = [n + r for n in names for r in _expand_ranges(ranges)]
        hosts += names
    return hosts


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The ``torchrun`` variables a Slurm task stands for, or ``{}`` when not under ``srun`` (or under
    ``torchrun``, whose variables win).

    Args:
        env: the environment, e.g. ``os.environ``.

    Returns:
        ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (else
        ``SLURM_NTASKS``) and ``SLURM_LOCALID``; ``MASTER_ADDR`` the first node of
        ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``) and ``MASTER_PORT`` from ``SLURM_JOB_ID``,
        unless the environment sets those two already.
    """
    if any(name in env for name in _TORCHRUN_VARIABLES) or not all(name in env for name in _SLURM_VARIABLES):
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]),
           "LOCAL_RANK": env["SLURM_LOCALID"]}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and nodelist:
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % _PORT_SPAN)
    return out


def init_world() -> World:
    """Join the process group that ``torchrun`` or ``srun`` describes in the environment, if any."""
    os.environ.update(slurm_environment(os.environ))  # init_process_group reads MASTER_ADDR/PORT there
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        # modulo: a Slurm task bound to its own GPU (--gpus-per-task=1) sees one device, whatever its rank
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
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
    return any_rank_each(torch.tensor([flag], device=world.device), world)[0]


def any_rank_each(flags: torch.Tensor, world: World) -> list[bool]:
    """For each of ``flags`` (a 1-D tensor on ``world.device``), whether it is true on any rank: one
    all-reduce for them all, and one wait for the device."""
    counts = flags.float()
    if world.size > 1:
        dist.all_reduce(counts)
    return [count > 0 for count in counts.tolist()]


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
