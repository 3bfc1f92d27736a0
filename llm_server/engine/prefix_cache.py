"""Automatic prefix caching: KV of full token blocks kept after their request, reused by later ones.

Structure (as nano-vllm's and vLLM's block managers): a prompt is cut into full blocks of
``block_size`` tokens; each block is keyed by a chain hash of its parent's key and its own ids,
so a key names the whole prefix up to the block's end. A block holds a copy of that prefix's keys
and values for its ``block_size`` positions, in the layout of the engine's
:class:`~.kv_cache.SlotCache` (keys ``[layers, kv_heads, head_dim, block]``, values
``[layers, kv_heads, block, head_dim]``).

How attention reads shared KV: it does not. At admission the matched blocks are **copied into the
sequence's own slot** (:meth:`PrefixCache.restore`), and the sequence prefills only the rest, so
the decode step is exactly today's (contiguous slots, no block tables). Copying is cheap next to
the prefill it saves: the numbers are in docs/engine.md ("Prefix caching"). The KV of a request
is copied out into blocks (:meth:`PrefixCache.save`) when its prompt is in and again when it
finishes (then its generated tokens too: a chat's next turn starts with them).

Memory: every cached token counts against the engine's KV budget (``max_total_tokens``) beside
the running sequences' reservations. The scheduler evicts unreferenced blocks, least recently
used first (deepest first within a chain, so no block outlives its parent for long), when an
admission needs room; a block is referenced (``refs``) between its match at admission and the
copy into the slot. ``save`` only fills the room the running sequences leave.

The last prompt token is always prefilled (its logits give the first new token), so a match
covers at most ``len(prompt) - 1`` tokens, rounded down to whole blocks.

Only the scheduler thread calls this module; ``queries`` / ``hits`` are read by ``stats()``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_server.engine.kv_cache import SlotCache
from llm_server.engine.runner import KVHandle
from llm_server.engine.sequence import Sequence as EngineSequence

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens per cached block (vLLM's default)


@dataclass(eq=False)
class Block:
    """The KV of one full block of a prefix: ``ids`` preceded by the prefix that ``parent`` names."""

    key: int
    parent: int | None
    ids: tuple[int, ...]
    keys: torch.Tensor  # [layers, kv_heads, head_dim, block_size]
    values: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    refs: int = 0  # admitted sequences that matched it and have not copied it yet


def chain_key(parent: int | None, ids: tuple[int, ...]) -> int:
    """The key of a block: its parent's key and its own ids, hashed together."""
    return hash((parent, ids))


class PrefixCache:
    """Full blocks of computed KV, keyed by chain hash, evicted least recently used first.

    ``max_tokens``: the most tokens it keeps (a multiple of ``block_size`` is used). Counters,
    in prompt tokens: ``queries`` (looked up), ``hits`` (served from the cache).
    """

    def __init__(self, max_tokens: int, block_size: int = BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.max_blocks = max(max_tokens, 0) // block_size
        self._blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.queries = 0
        self.hits = 0

    @property
    def tokens(self) -> int:
        """Tokens whose KV the cache holds now."""
        return len(self._blocks) * self.block_size

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    # --- lookup -------------------------------------------------------------------------
    def _chain(self, ids: Sequence[int], limit: int) -> list[Block]:
        """The cached blocks that start ``ids[:limit]``, in order (stops at the first miss)."""
        size, found, parent = self.block_size, [], None
        for start in range(0, limit - size + 1, size):
            chunk = tuple(ids[start : start + size])
            block = self._blocks.get(chain_key(parent, chunk))
            if block is None or block.parent != parent or block.ids != chunk:  # a miss (or a hash collision)
                break
            found.append(block)
            parent = block.key
        return found

    def _touch(self, chain: list[Block]) -> None:
        """Mark ``chain`` most recently used, its root last (so eviction takes the deepest first)."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def acquire(self, prompt_ids: Sequence[int]) -> list[Block]:
        """The blocks a new request can reuse (at least its last prompt token stays to prefill),
        referenced (safe from eviction) until :meth:`restore` or :meth:`release`."""
        chain = self._chain(prompt_ids, len(prompt_ids) - 1)
        self._touch(chain)
        for block in chain:
            block.refs += 1
        return chain

    @staticmethod
    def release(chain: list[Block]) -> None:
        """Drop the references :meth:`acquire` took (a sequence that will not copy them)."""
        for block in chain:
            block.refs -= 1

    # --- eviction -----------------------------------------------------------------------
    def evict(self, tokens: int) -> int:
        """Drop unreferenced blocks, least recently used first, until ``tokens`` are freed;
        the tokens freed (less when too many blocks are referenced)."""
        freed = 0
        for key in [k for k, b in self._blocks.items() if b.refs == 0]:
            if freed >= tokens:
                break
            del self._blocks[key]
            freed += self.block_size
        return freed

    def clear(self) -> None:
        """Drop every block (referenced ones too: callers hold their own references)."""
        self._blocks.clear()

    # --- copying KV in and out of a slot ------------------------------------------------
    def restore(self, cache: SlotCache, handle: KVHandle, chain: list[Block], prompt_tokens: int) -> int:
        """Copy ``chain`` into ``handle``'s slot (taking one if needed) as its first positions and
        drop the references; the tokens restored (the sequence prefills from there). Counts the
        query (``prompt_tokens``) and the hit."""
        try:
            self.queries += prompt_tokens
            if not chain:
                return 0
            if handle.slot < 0:
                cache.take_slot(handle)
            count = len(chain) * self.block_size
            cache.fit(count)
            for i, block in enumerate(chain):
                cache.write(handle.slot, i * self.block_size, block.keys, block.values)
            handle.length = count
            self.hits += count
            return count
        finally:
            self.release(chain)

    def save(self, cache: SlotCache, handle: KVHandle, ids: Sequence[int], room: int) -> int:
        """Keep the KV of ``handle``'s full blocks (``ids`` are the tokens of its first positions)
        that the cache lacks, within ``room`` tokens for the whole cache (and ``max_tokens``),
        evicting older unreferenced blocks as needed; the tokens copied out."""
        size = self.block_size
        usable = min(len(ids), handle.length) // size * size
        chain = self._chain(ids, usable)
        self._touch(chain)
        limit = min(self.max_blocks, max(room, 0) // size)
        new = min(usable // size - len(chain), limit - len(chain))
        if new <= 0 or handle.slot < 0:
            return 0
        excess = len(self._blocks) + new - limit
        if excess > 0:
            for block in chain:  # the chain being extended stays
                block.refs += 1
            new -= max(0, excess - self.evict(excess * size) // size)
            self.release(chain)
        if new <= 0:
            return 0
        parent = chain[-1].key if chain else None
        start = len(chain) * size
        keys, values = cache.read(handle.slot, start, start + new * size)
        for i in range(new):
            chunk = tuple(ids[start + i * size : start + (i + 1) * size])
            key = chain_key(parent, chunk)
            span = slice(i * size, (i + 1) * size)
            self._blocks[key] = Block(key, parent, chunk, keys[..., span].clone(), values[..., span, :].clone())
            parent = key
        self._touch(self._chain(ids, start + new * size))
        return new * size

    # --- the engine's two calls ------------------------------------------------------------
    def restore_into(self, cache: SlotCache | None, seq: EngineSequence) -> int:
        """Copy the blocks admission matched for ``seq`` (its ``prefix_chain``) into its slot; the
        tokens restored (0 without a slot cache: the chain is only released)."""
        chain, seq.prefix_chain = seq.prefix_chain, []
        if cache is None or seq.kv is None:
            self.release(chain)
            return 0
        return self.restore(cache, seq.kv, chain, seq.prompt_len)

    def save_from(self, cache: SlotCache | None, seq: EngineSequence, room: int) -> None:
        """Keep ``seq``'s computed prompt and generated tokens' full blocks (see :meth:`save`); a
        failure is logged, never raised (the cache is an optimisation: the request goes on). Drops
        the references of a chain ``seq`` never restored (it failed first)."""
        self.release(seq.prefix_chain)
        seq.prefix_chain = []
        if cache is None or seq.kv is None or room <= 0:
            return
        try:
            self.save(cache, seq.kv, [*seq.request.prompt_ids, *seq.generated], room)
        except Exception:  # noqa: BLE001
            logger.warning("request %s: keeping its prefix failed", seq.request_id, exc_info=True)


__all__ = ["BLOCK_SIZE", "Block", "PrefixCache", "chain_key"]
