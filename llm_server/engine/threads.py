"""The scheduler thread's torch (OpenMP) thread count, chosen for the cores this process may use.

Each thread that runs torch ops gets its own OpenMP team; on a small machine an idle team's
spinning workers steal the cores the working team needs (issue 9 measured a 2x slower step on 2
cores when the model was loaded on one thread and stepped on another). The engine therefore runs
every torch op of its model on one thread and sizes that thread's team here:

- ``engine.threads`` when set (> 0);
- else ``OMP_NUM_THREADS`` when the environment sets it (torch already follows it);
- else the number of cores in this process's CPU affinity mask (``os.sched_getaffinity``: a
  container or ``taskset`` limit, not the host's core count).

The OpenMP wait policy is left at the runtime's default (spin briefly, then sleep): with a single
team nothing competes for its spinning workers, and ``PASSIVE`` costs a futex wake-up per parallel
region (~600 per step). Export ``OMP_WAIT_POLICY`` before start to change it.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(requested: int) -> int:
    """Set the calling thread's torch thread count (see the module docstring); return it."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cores())
    threads = torch.get_num_threads()
    logger.info("engine thread: %d torch threads (%d cores available, OMP_WAIT_POLICY=%s)", threads,
                available_cores(), os.environ.get("OMP_WAIT_POLICY", "default"))
    return threads


__all__ = ["available_cores", "configure_threads"]
