"""How many CPUs this process may use, and the OpenMP defaults that share them politely.

Both are read by OpenMP once, when torch loads: `set_thread_defaults` must run before ``import torch``.
"""

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup v2 CPU quota.

    Args:
        cpu_max: the cgroup's ``cpu.max`` (``"QUOTA PERIOD"`` in microseconds, or ``"max PERIOD"``).
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return max(1, min(count, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or no quota ("max")
        return count


def data_workers(requested: int) -> int:
    """Data loader workers: as many as asked, no more than the CPUs each local process may use."""
    per_process = usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(requested, max(1, per_process))


def set_thread_defaults(environ: MutableMapping[str, str] = os.environ, cpus: int | None = None) -> None:
    """Passive OpenMP waiting, and no more threads than `usable_cpus`, unless the user set either.

    Idle OpenMP threads otherwise spin on their CPU: on 2 shared cores a run fell from ~285 to ~30 images/s
    beside one other job (benchmarks/RESULTS.md). torch's own thread count follows the affinity mask but not
    a container's cgroup quota.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = usable_cpus() if cpus is None else cpus
    if cpus < (os.cpu_count() or cpus):
        environ.setdefault("OMP_NUM_THREADS", str(cpus))
