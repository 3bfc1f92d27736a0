"""The compact runner's KV cache: one slot per running sequence, sized by what is in use.

Keys are stored transposed, ``[layers, rows, kv_heads, head_dim, capacity]``, values as
``[layers, rows, kv_heads, capacity, head_dim]``, so attention reads a batch in consecutive slots
as contiguous views over the whole capacity (a narrower view would make bf16 ``bmm`` copy it).

The cache grows with use, never per step:

- rows: the highest slot in use, rounded up to a power of two (at most ``max_slots``);
- capacity (positions): a multiple of 32 with at least one step of headroom above the longest
  sequence; when a step needs more it grows by an eighth (at least 32), so a long generation
  re-allocates O(log) times and attention reads little masked padding;
- it shrinks (with hysteresis, so growth and shrinking cannot alternate step by step) when the
  rows in use fall to a quarter or the capacity is far above the longest sequence, and it is
  freed when no sequence runs (the next request re-allocates a small one: cheap).

Freed memory goes back to the OS: glibc keeps freed heap pages (the step's activations, an old
cache) unless asked, so the cache calls ``malloc_trim`` when it is freed, when it shrinks, and at
most every ``TRIM_INTERVAL_S`` seconds under steady load (a 10-minute soak at 32 concurrent
otherwise let RSS creep from 1.5 to 1.8 GB, and it fell back only once the load stopped).

Re-allocating keeps every written position; unwritten positions hold zeros (masked positions
must be finite).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CAPACITY_STEP = 32  # the capacity is a multiple of this, a little above the longest sequence
_SHRINK_SLACK = 128  # shrink the capacity once it exceeds what the sequences need by this (or a quarter)
_ROW_SHRINK_FACTOR = 4  # shrink the rows once the slots in use fit in a quarter of them
TRIM_INTERVAL_S = 10.0  # under steady load, hand freed heap pages back at most this often
_clock = time.monotonic  # the trim schedule's clock (tests replace it)


@dataclass(eq=False)
class KVHandle:
    """One sequence's place in a runner's KV cache."""

    length: int = 0  # tokens already in the cache
    slot: int = -1  # batched runner: row of the cache tensors
    state: Any = None  # fallback runner: the model's own cache object


def _round_rows(used: int, limit: int) -> int:
    """``used`` rounded up to a power of two, at most ``limit``."""
    return min(limit, 1 << max(used - 1, 0).bit_length()) if used else 0


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SlotCache:
    """Slots (one per running sequence) and the key/value tensors behind them."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, max_slots: int, max_context: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self._shape = (layers, kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.max_slots = max_slots
        self._max_capacity = (max_context // CAPACITY_STEP + 2) * CAPACITY_STEP
        self.owner: list[KVHandle | None] = [None] * max_slots
        self.keys, self.values = self._zeros(0, 0)
        self.rows = 0  # slots allocated: 0 .. rows - 1
        self.capacity = 0  # positions allocated per slot
        self._trimmed_at = _clock()

    @property
    def nbytes(self) -> int:
        """Bytes the cache tensors hold."""
        return self.keys.nbytes + self.values.nbytes

    def _zeros(self, rows: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers, kv_heads, head_dim = self._shape
        dtype, device = self._dtype, self._device
        keys = torch.zeros((layers, rows, kv_heads, head_dim, capacity), dtype=dtype, device=device)
        values = torch.zeros((layers, rows, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        return keys, values

    # --- slots --------------------------------------------------------------------------
    def take_slot(self, handle: KVHandle) -> None:
        """Give ``handle`` the lowest free slot (allocated by the next :meth:`fit`)."""
        slot = self.owner.index(None)  # the scheduler never admits more than max_slots
        self.owner[slot] = handle
        handle.slot = slot

    def release(self, handle: KVHandle) -> None:
        if handle.slot >= 0 and self.owner[handle.slot] is handle:
            self.owner[handle.slot] = None
        handle.slot = -1
        handle.length = 0

    def idle(self) -> None:
        """No sequence runs: free the cache."""
        if self.rows and all(o is None for o in self.owner):
            self.keys, self.values = self._zeros(0, 0)
            self.rows = self.capacity = 0
            self._trim()

    def _trim(self) -> None:
        _trim_heap()
        self._trimmed_at = _clock()

    # --- size ---------------------------------------------------------------------------
    def fit(self, needed: int) -> None:
        """Make room in every taken slot for ``needed`` positions (see the module docstring)."""
        taken = [slot for slot, o in enumerate(self.owner) if o is not None]
        rows = _round_rows(taken[-1] + 1 if taken else 0, self.max_slots)
        if rows < self.rows and rows * _ROW_SHRINK_FACTOR > self.rows:
            rows = self.rows  # not worth a copy yet
        longest = max([needed] + [o.length for o in self.owner if o is not None])
        tight = (longest // CAPACITY_STEP + 2) * CAPACITY_STEP  # at least one step of headroom
        capacity = self.capacity
        if needed > capacity:
            grown = capacity + max(CAPACITY_STEP, capacity // 8 // CAPACITY_STEP * CAPACITY_STEP)
            capacity = max(tight, min(grown, self._max_capacity))
        elif capacity > tight + max(_SHRINK_SLACK, capacity // 4):
            capacity = tight
        shrinking = rows < self.rows or capacity < self.capacity
        if (rows, capacity) != (self.rows, self.capacity):
            self._resize(rows, capacity)
        if shrinking or _clock() - self._trimmed_at > TRIM_INTERVAL_S:
            self._trim()

    def _resize(self, rows: int, capacity: int) -> None:
        """Re-allocate as ``rows`` x ``capacity``, keeping what fits (every taken slot and written
        position does)."""
        keys, values = self._zeros(rows, capacity)
        kept_rows, kept = min(rows, self.rows), min(capacity, self.capacity)
        keys[:, :kept_rows, ..., :kept] = self.keys[:, :kept_rows, ..., :kept]
        values[:, :kept_rows, :, :kept] = self.values[:, :kept_rows, :, :kept]
        self.keys, self.values, self.rows, self.capacity = keys, values, rows, capacity

    # --- copying positions in and out (the prefix cache) -----------------------------------
    def read(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions ``start..stop`` of ``slot``: keys ``[layers, kv_heads, head_dim, n]``,
        values ``[layers, kv_heads, n, head_dim]`` (clone them to keep them past the next step)."""
        return self.keys[:, slot, ..., start:stop], self.values[:, slot, :, start:stop]

    def write(self, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy ``keys`` / ``values`` (as :meth:`read` returns them) into ``slot`` from position ``start``
        (the capacity must already fit them: :meth:`fit`)."""
        stop = start + keys.shape[-1]
        self.keys[:, slot, ..., start:stop] = keys
        self.values[:, slot, :, start:stop] = values

    # --- placement ----------------------------------------------------------------------
    def make_contiguous(self, batch: Sequence[KVHandle]) -> int:
        """Rearrange slots so ``batch`` occupies consecutive slots; return the first one."""
        n = len(batch)
        lo = min(min(h.slot for h in batch), self.rows - n)
        members = {id(h) for h in batch}
        outside = [h for h in batch if not lo <= h.slot < lo + n]
        if outside:
            free = [s for s in range(lo, lo + n) if self.owner[s] is None or id(self.owner[s]) not in members]
            for handle, slot in zip(outside, free, strict=True):
                self._move(handle.slot, slot)
        return lo

    def _move(self, src: int, dst: int) -> None:
        """Exchange the contents (and owners) of two slots."""
        for cache in (self.keys, self.values):
            if self.owner[dst] is None:
                cache[:, dst] = cache[:, src]
            else:
                saved = cache[:, dst].clone()
                cache[:, dst] = cache[:, src]
                cache[:, src] = saved
        moving, other = self.owner[src], self.owner[dst]
        self.owner[dst], self.owner[src] = moving, other
        if moving is not None:
            moving.slot = dst
        if other is not None:
            other.slot = src


__all__ = ["CAPACITY_STEP", "SlotCache"]
