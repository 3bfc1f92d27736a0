"""The OpenMP wait policy a server process runs with (torch-free: applied before torch loads).

libgomp, torch's OpenMP runtime, reads ``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY`` once, when torch is
imported. Its default lets idle workers spin for a long time (about 300,000 iterations) between
parallel regions. The bare forward likes that, but a server also needs the cores for its event
loop, its HTTP streams and, on a small machine, everything else: on the 2-core EPYC a served
stream ran at 34.8 tok/s (1 concurrent) and 284.6 tok/s (16 concurrent) with the default, and at
64.9 and 425.3 tok/s with ``GOMP_SPINCOUNT=10000`` (docs/engine.md, "OpenMP wait policy"). Since
the fused CPU kernels and their VNNI linears made a step's parallel regions short and close
together, 50,000 spins serve better again: 145-153 / 450-469 / 557-566 tok/s at 1 / 16 / 32
against 114-135 / 404 / 482-546 with 10,000 (alternated runs, 2026-12-07).

So a server process (``create_app``, hence ``start_llm_server``, uvicorn's factory and every Ray
replica) sets ``GOMP_SPINCOUNT=50000`` unless the environment already chose a wait policy, and
only while torch is not yet imported (after that the setting would change nothing, and the log
must not claim it). The Python API (``ConversationEngine``) changes nothing.
"""

from __future__ import annotations

import os
import sys

#: The spin count a server process uses when the environment sets no wait policy.
SERVER_SPINCOUNT = "50000"
_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_applied_here = False


def apply_server_wait_policy() -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SERVER_SPINCOUNT` when no wait policy is set and torch is
    not imported yet; return whether it was set."""
    global _applied_here
    if "torch" in sys.modules or any(os.environ.get(name) for name in _POLICY_VARIABLES):
        return False
    os.environ["GOMP_SPINCOUNT"] = SERVER_SPINCOUNT
    _applied_here = True
    return True


def wait_policy() -> str:
    """The OpenMP wait policy in effect, in words (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``)."""
    settings = [f"{name}={os.environ[name]}" for name in _POLICY_VARIABLES if os.environ.get(name)]
    if not settings:
        return "default spinning"
    return ", ".join(settings) + (" (the server's default)" if chosen_by_server() else "")


def chosen_by_server() -> bool:
    """Whether the policy in effect is the one :func:`apply_server_wait_policy` set (not the user's)."""
    return _applied_here and os.environ.get("GOMP_SPINCOUNT") == SERVER_SPINCOUNT


__all__ = ["SERVER_SPINCOUNT", "apply_server_wait_policy", "chosen_by_server", "wait_policy"]
