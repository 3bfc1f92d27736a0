"""The scheduler thread's torch (OpenMP) thread count, chosen for the cores this process may use.

Each thread that runs torch ops gets its own OpenMP team; on a small machine an idle team's
spinning workers steal the cores the working team needs (issue 9 measured a 2x slower step on 2
cores when the model was loaded on one thread and stepped on another). The engine therefore runs
every torch op of its model on one thread and sizes that thread's team here:

- ``engine.threads`` when set (> 0);
- else ``OMP_NUM_THREADS`` when the environment sets it (torch already follows it);
- else the cores this process may really use: its CPU affinity mask (``os.sched_getaffinity``:
  ``taskset``, cpusets), further capped by a cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``: a
  container's ``--cpus`` / Kubernetes CPU limit), never the host's core count.

The OpenMP wait policy is chosen before torch loads (:mod:`llm_server.engine.wait_policy`): a
server process spins ``GOMP_SPINCOUNT=10000`` iterations unless the environment chose a policy.
On a machine whose cores other busy processes share, spinning workers lose their time slices and
a step can be 10x slower; there ``GOMP_SPINCOUNT=100`` exported before the server starts, or
``engine.threads: 1``, is much faster (docs/engine.md has the measurements). The engine's start
logs the thread count and the wait policy in effect, and warns when the machine is already busier
than the cores this process may use (1-minute load average) while the workers would spin.
"""

from __future__ import annotations

import logging
import os

import torch

from llm_server.engine.heap_policy import heap_policy
from llm_server.engine.wait_policy import chosen_by_server, wait_policy

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, capped by a cgroup CPU quota), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs allowed by the cgroup v2 quota (``"<quota> <period>"``), or None when unlimited/unknown."""
    try:
        with open(path, encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _load_average() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def configure_threads(requested: int) -> int:
    """Set the calling thread's torch thread count (see the module docstring), log it with the wait
    policy, warn on an already busy machine; return the thread count."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cores())
    threads, cores, policy = torch.get_num_threads(), available_cores(), wait_policy()
    logger.info("engine thread: %d torch threads (%d cores available), OpenMP wait policy: %s, heap: %s",
                threads, cores, policy, heap_policy())
    load = _load_average()
    if load is not None and load > cores and threads > 1 and (policy == "default spinning" or chosen_by_server()):
        logger.warning(
            "the 1-minute load average (%.1f) already exceeds the %d cores this process may use: with other busy "
            "processes on its cores the engine's spinning OpenMP workers can make it 10-20x slower; export "
            "GOMP_SPINCOUNT=100 before starting the server, or set engine.threads: 1 (docs/engine.md)", load, cores)
    return threads


__all__ = ["available_cores", "configure_threads", "wait_policy"]
