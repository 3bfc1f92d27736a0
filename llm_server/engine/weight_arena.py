"""One buffer in 2 MB pages for the quantized weights a decode step streams.

A decode step of one sequence reads every weight once, so its speed is the speed of that read.
Each quantized linear's tensors are separate allocations of 4 KB pages (most under 2 MB, below
what torch or the kernel would back with huge pages): every 4 KB of weight costs a TLB miss, and
the hardware prefetchers start over at each page. :func:`pack_streamed` copies the tensors into
one anonymous mapping advised ``MADV_HUGEPAGE`` (Linux transparent huge pages in the ``madvise``
or ``always`` mode), in the order the step reads them, and re-points each tensor to its copy
(``Tensor.set_``: every holder of the tensor sees the move; the old storage is freed). On the
embedded model (AVX-512 EPYC, 2 threads) a decode step went from 4.12 to 3.72 ms (median of 10
interleaved rounds; docs/benchmarks.md). Where huge pages are off or the platform has no
``madvise``, the copy still runs and the weights are just contiguous. ``LLM_SERVER_WEIGHT_ARENA=0``
leaves the weights where they are (for comparison).

The engine owns nothing here beyond memory: values, dtypes and shapes are unchanged.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "LLM_SERVER_WEIGHT_ARENA"
HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


@dataclass
class WeightArena:
    """The mapping the packed weights live in (kept alive with the runner), and what it holds."""

    mapping: mmap.mmap
    tensors: int
    bytes: int
    huge_pages: bool


def _movable(tensor: torch.Tensor) -> bool:
    """CPU, contiguous, and not a view: a view's base would keep the old storage alive (twice the memory)."""
    return (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.layout == torch.strided
            and tensor._base is None and not tensor.requires_grad)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The movable tensors in first-seen order, one per storage (a tensor met twice is packed once)."""
    seen: set[int] = set()
    kept = []
    for tensor in tensors:
        if not _movable(tensor):  # checked first: a tensor of another layout may have no plain storage
            continue
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            kept.append(tensor)
    return kept


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def pack_streamed(tensors: Iterable[torch.Tensor]) -> WeightArena | None:
    """Move ``tensors`` (CPU, contiguous) into one buffer advised for huge pages, in the given order;
    None when there is nothing to move (or ``LLM_SERVER_WEIGHT_ARENA=0``, or no anonymous mappings)."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows has none)
        return None
    chosen = _unique(tensors)
    size = sum(_aligned(t.numel() * t.element_size()) for t in chosen)
    if size == 0:
        return None
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    huge = False
    if advice is not None:
        try:
            mapping.madvise(advice)
            huge = True
        except OSError as error:  # a kernel without transparent huge pages
            logger.debug("weights not advised for huge pages: %s", error)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    at = (-raw.data_ptr()) % HUGE_PAGE  # the first tensor on a 2 MB boundary
    with torch.no_grad():
        for tensor in chosen:
            count = tensor.numel() * tensor.element_size()
            copy = raw[at : at + count].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            tensor.set_(copy.untyped_storage(), copy.storage_offset(), copy.shape, copy.stride())
            at += _aligned(count)
    logger.info("%d weight tensors (%.1f MB) in one buffer%s", len(chosen), size / 1e6,
                " advised for 2 MB pages" if huge else "")
    return WeightArena(mapping, len(chosen), size, huge)


__all__ = ["WeightArena", "pack_streamed"]
