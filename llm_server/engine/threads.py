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

With the cores chosen, a model whose decode steps are very short leaves one core to the rest of
the server (:func:`reserve_io_core`): every streamed token also costs the event loop JSON, SSE and a
socket write, about :data:`IO_SECONDS_PER_TOKEN` of CPU, so a tiny model that decodes thousands of
tokens a second needs most of a core for that alone, and an OpenMP team spread over every core then
stalls on the core the event loop holds. The engine times a decode step of ``max_running`` rows
after its warm-up; when the tokens it would stream need at least :data:`RESERVE_CORE_ABOVE` of a
core, it runs one thread fewer. Never when the thread count was chosen (``engine.threads``,
``OMP_NUM_THREADS``) or is 1, and not timed with a context under :data:`IO_MIN_CONTEXT`.
Measured on the 2-core EPYC (docs/engine.md, "A core for the server's I/O"): tiny random Qwen3 /
OLMo 2 served at 16 concurrent, 1 thread vs 2: +24-35 % tok/s;
the embedded SmolLM2 (a 33 ms step at 16 rows) keeps both threads, 1 thread there is 20-30 % slower.

The OpenMP wait policy is chosen before torch loads (:mod:`llm_server.engine.wait_policy`): a
server process spins ``GOMP_SPINCOUNT=50000`` iterations unless the environment chose a policy.
On a machine whose cores other busy processes share, spinning workers lose their time slices and
a step can be 10x slower; there ``GOMP_SPINCOUNT=100`` exported before the server starts, or
``engine.threads: 1``, is much faster (docs/engine.md has the measurements). The engine's start
logs the thread count and the wait policy in effect, and warns when the machine is already busier
than the cores this process may use (1-minute load average) while the workers would spin.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

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


#: CPU seconds the server spends per streamed token outside the engine (event loop, JSON, SSE, the
#: socket): py-spy of the HTTP server at 16 concurrent on a tiny model, 2026-12-07 (the event loop
#: thread busy ~16 % of 12 s while 950 tokens/s streamed: ~170 us a token).
IO_SECONDS_PER_TOKEN = 150e-6
#: Leave a core to the server's I/O when the engine's token rate would need this share of one.
RESERVE_CORE_ABOVE = 0.5
#: The batch the decode step is timed at (``max_running`` when smaller).
IO_ROWS = 16
#: Timing the step writes this many positions into each throwaway row: no timing below this context.
IO_MIN_CONTEXT = 64
#: A decode step slower than this (seconds) is a model too large for the I/O to matter: not timed further.
SLOW_STEP_S = 0.05


def io_cores(step_s: float, rows: int) -> float:
    """Cores the server's I/O needs to stream ``rows`` tokens every ``step_s`` seconds."""
    return rows / max(step_s, 1e-9) * IO_SECONDS_PER_TOKEN


def may_reserve_io_core(requested: int) -> bool:
    """Whether :func:`reserve_io_core` may leave a core: nobody chose the thread count (``requested``
    0, no ``OMP_NUM_THREADS``) and there is more than one thread."""
    return requested <= 0 and not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > 1


def reserve_io_core(time_step: Callable[[int], float], rows: int, requested: int) -> int:
    """After warm-up: one torch thread fewer when the decode step of ``rows`` rows (``time_step(rows)``:
    its seconds) is so short that streaming its tokens needs :data:`RESERVE_CORE_ABOVE` of a core (see
    the module docstring); return the thread count in effect."""
    threads = torch.get_num_threads()
    if not may_reserve_io_core(requested) or time_step(1) > SLOW_STEP_S:
        return threads
    step_s = time_step(rows)
    need = io_cores(step_s, rows)
    if need < RESERVE_CORE_ABOVE:
        return threads
    torch.set_num_threads(threads - 1)
    logger.info("engine thread: %d torch threads, one core left to the server's I/O (a %d-row decode step takes "
                "%.1f ms: streaming its tokens needs %.1f cores)", threads - 1, rows, step_s * 1000, need)
    return threads - 1


def step_timer(forward: Callable[[int], object], steps: int = 5) -> Callable[[int], float]:
    """``rows -> seconds`` of one call of ``forward(rows)`` (the fastest of ``steps``, after one unmeasured)."""
    def time_step(rows: int) -> float:
        forward(rows)
        best = float("inf")
        for _ in range(steps):
            started = time.perf_counter()
            forward(rows)
            best = min(best, time.perf_counter() - started)
        return best

    return time_step


__all__ = ["IO_MIN_CONTEXT", "IO_ROWS", "IO_SECONDS_PER_TOKEN", "available_cores", "configure_threads", "io_cores",
           "may_reserve_io_core", "reserve_io_core", "step_timer", "wait_policy"]
