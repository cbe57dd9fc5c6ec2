"""What the machine lends this process: the CPUs it may run on.

`os.cpu_count()` counts the host's cores; a process pinned by `taskset`, Slurm or a container may use
fewer. Data loader workers and torch threads beyond that number only wait for each other.
"""

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows, rounded up, or None without a quota.

    Args:
        cpu_max: the cgroup's ``cpu.max`` file: ``"<quota> <period>"`` in microseconds, or ``"max <period>"``.
    """
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, bounded by the cgroup quota; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    return max(1, min(cpus, limit) if limit else cpus)
