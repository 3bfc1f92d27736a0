"""The glibc heap settings a server process runs with (torch-free; ``mallopt`` through ctypes).

A decode step allocates and frees tensors of a few MB each (16 rows of logits over a 49,152-id
vocabulary are 3 MB; the sampler makes several such tensors per step). glibc serves blocks above
its mmap threshold with ``mmap`` and hands them back with ``munmap``, and trims the heap top as
soon as 128 kB are free; its threshold adapts to freed blocks, so the same step runs fast for a
while and then slower as the threshold moves. Every fresh page costs a page fault. Measured on the
2-vCPU EPYC (docs/engine.md, "Heap policy"): ``Sampler.select`` over 16 rows with every sampling
field set took 6-7 ms for the first hundred steps of a process and 12.5-13.5 ms after; with the
settings below, 6.4-6.6 ms throughout (``benchmarks/sampler_bench.py``, chat-prompt logits).

So a server process (``create_app``: ``start_llm_server``, uvicorn's factory, every Ray replica)
keeps blocks up to :data:`MMAP_THRESHOLD` on the heap, lets :data:`TRIM_THRESHOLD` of free heap
stay mapped and grows the heap :data:`TOP_PAD` at a time. Freed memory still goes back to the OS:
the KV cache calls ``malloc_trim`` when it shrinks, when it is freed and every 10 s under load
(:mod:`llm_server.engine.kv_cache`). A user who exported one of these three settings
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) keeps glibc's behaviour
with theirs (``MALLOC_ARENA_MAX`` is independent and combines with the policy);
other C libraries than glibc are left alone. The Python API (``ConversationEngine``) changes nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

#: Blocks up to this size come from the heap, not from a fresh mmap.
MMAP_THRESHOLD = 64 << 20
#: Free memory at the heap top that glibc keeps instead of trimming at once.
TRIM_THRESHOLD = 128 << 20
#: Extra room the heap grows by when it grows.
TOP_PAD = 16 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_applied = False


def apply_server_heap_policy() -> bool:
    """Apply the server's glibc heap settings unless the environment chose some; return whether
    they are in effect now (also True when an earlier call applied them)."""
    global _applied
    if _applied:
        return True
    if any(os.environ.get(name) for name in _USER_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    _applied = all(mallopt(option, value) == 1 for option, value in settings)
    return _applied


def heap_policy() -> str:
    """The heap settings in effect, in words (for the start-up log)."""
    if _applied:
        return f"mmap threshold {MMAP_THRESHOLD >> 20} MB, trim threshold {TRIM_THRESHOLD >> 20} MB (the server's)"
    chosen = [f"{name}={os.environ[name]}" for name in _USER_VARIABLES if os.environ.get(name)]
    return ", ".join(chosen) if chosen else "the C library's defaults"


__all__ = ["MMAP_THRESHOLD", "TOP_PAD", "TRIM_THRESHOLD", "apply_server_heap_policy", "heap_policy"]
