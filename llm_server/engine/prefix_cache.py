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
covers at most ``len(prompt) - 1`` tokens. Where the chain of whole blocks ends, the match goes on
inside the next block, token by token, as SGLang's radix cache and llama.cpp's slots do: among the
cached children of the last matched block (the most recently used :data:`TAIL_CANDIDATES`), the one
that shares the most leading ids with the prompt lends that many positions (a position's KV depends
only on the ids up to it, so any continuation may reuse them). A system prompt shorter than a block,
a prompt sent again, or the passes of an improvement stage that part mid-block then prefill only
what differs.

Only the scheduler thread calls this module; ``queries`` / ``hits`` are read by ``stats()``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from llm_server.engine.kv_cache import SlotCache
from llm_server.engine.runner import KVHandle
from llm_server.engine.sequence import Sequence as EngineSequence

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens per cached block (vLLM's default)
TAIL_CANDIDATES = 32  # children of the last matched block compared for a match inside the next one


@dataclass(eq=False)
class Block:
    """The KV of one full block of a prefix: ``ids`` preceded by the prefix that ``parent`` names."""

    key: int
    parent: int | None
    ids: tuple[int, ...]
    keys: torch.Tensor  # [layers, kv_heads, head_dim, block_size]
    values: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    refs: int = 0  # admitted sequences that matched it and have not copied it yet


@dataclass(eq=False)
class PrefixMatch:
    """The blocks admission matched for a prompt, held (referenced) until they are copied into its
    slot: whole blocks, the last of them possibly only in part; ``tokens`` the positions they cover."""

    blocks: list[Block] = field(default_factory=list)
    tokens: int = 0


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


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
        self._children: dict[int | None, OrderedDict[int, Block]] = {}  # by parent key, least recently used first
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

    def _tail(self, parent: int | None, ids: Sequence[int]) -> tuple[Block | None, int]:
        """The recently used child of ``parent`` that shares the most leading ids with ``ids``, and how many."""
        best, best_count = None, 0
        children = self._children.get(parent)
        for block in islice(reversed(children.values()), TAIL_CANDIDATES) if children else ():
            count = common_length(block.ids, ids)
            if count > best_count:
                best, best_count = block, count
        return best, best_count

    def _match(self, ids: Sequence[int], limit: int) -> PrefixMatch:
        """The cached prefix of ``ids[:limit]``: the chain of whole blocks, then a block shared in part."""
        blocks = self._chain(ids, limit)
        tokens = len(blocks) * self.block_size
        if tokens < limit:
            rest = ids[tokens : min(limit, tokens + self.block_size)]
            tail, count = self._tail(blocks[-1].key if blocks else None, rest)
            if tail is not None:
                blocks, tokens = [*blocks, tail], tokens + count
        return PrefixMatch(blocks, tokens)

    def _touch(self, chain: list[Block]) -> None:
        """Mark ``chain`` most recently used, its root last (so eviction takes the deepest first)."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)
            self._children[block.parent].move_to_end(block.key)

    def acquire(self, prompt_ids: Sequence[int]) -> PrefixMatch:
        """What a new request can reuse (at least its last prompt token stays to prefill), its
        blocks referenced (safe from eviction) until :meth:`restore` or :meth:`release`."""
        match = self._match(prompt_ids, len(prompt_ids) - 1)
        self._touch(match.blocks)
        for block in match.blocks:
            block.refs += 1
        return match

    @staticmethod
    def release(match: PrefixMatch) -> None:
        """Drop the references :meth:`acquire` took (a sequence that will not copy them)."""
        for block in match.blocks:
            block.refs -= 1
        match.blocks, match.tokens = [], 0

    def drop_tail(self, match: PrefixMatch) -> bool:
        """Release the block ``match`` uses only in part (admission gives it up rather than wait for
        room to reuse a few tokens); False when there is none."""
        if match.tokens % self.block_size == 0:
            return False
        match.blocks.pop().refs -= 1
        match.tokens = len(match.blocks) * self.block_size
        return True

    # --- eviction -----------------------------------------------------------------------
    def evict(self, tokens: int) -> int:
        """Drop unreferenced blocks, least recently used first, until ``tokens`` are freed;
        the tokens freed (less when too many blocks are referenced)."""
        freed = 0
        for key in [k for k, b in self._blocks.items() if b.refs == 0]:
            if freed >= tokens:
                break
            self._unlink(self._blocks.pop(key))
            freed += self.block_size
        return freed

    def _insert(self, block: Block) -> None:
        """Add ``block`` (in place of another one under its key: a hash collision)."""
        old = self._blocks.pop(block.key, None)
        if old is not None:
            self._unlink(old)
        self._blocks[block.key] = block
        self._children.setdefault(block.parent, OrderedDict())[block.key] = block

    def _unlink(self, block: Block) -> None:
        """Take ``block`` out of its parent's children (it has left ``_blocks``)."""
        siblings = self._children[block.parent]
        del siblings[block.key]
        if not siblings:
            del self._children[block.parent]

    def clear(self) -> None:
        """Drop every block (referenced ones too: callers hold their own references)."""
        self._blocks.clear()
        self._children.clear()

    # --- copying KV in and out of a slot ------------------------------------------------
    def restore(self, cache: SlotCache, handle: KVHandle, match: PrefixMatch, prompt_tokens: int) -> int:
        """Copy ``match`` into ``handle``'s slot (taking one if needed) as its first positions and
        drop the references; the tokens restored (the sequence prefills from there). Counts the
        query (``prompt_tokens``) and the hit."""
        try:
            self.queries += prompt_tokens
            count = match.tokens
            if count == 0:
                return 0
            if handle.slot < 0:
                cache.take_slot(handle)
            cache.fit(count)
            for i, block in enumerate(match.blocks):
                used = min(self.block_size, count - i * self.block_size)
                cache.write(handle.slot, i * self.block_size, block.keys[..., :used], block.values[..., :used, :])
            handle.length = count
            self.hits += count
            return count
        finally:
            self.release(match)

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
            for block in chain:
                block.refs -= 1
        if new <= 0:
            return 0
        parent = chain[-1].key if chain else None
        start = len(chain) * size
        keys, values = cache.read(handle.slot, start, start + new * size)
        for i in range(new):
            chunk = tuple(ids[start + i * size : start + (i + 1) * size])
            key = chain_key(parent, chunk)
            span = slice(i * size, (i + 1) * size)
            self._insert(Block(key, parent, chunk, keys[..., span].clone(), values[..., span, :].clone()))
            parent = key
        self._touch(self._chain(ids, start + new * size))
        return new * size

    # --- the engine's two calls ------------------------------------------------------------
    def restore_into(self, cache: SlotCache | None, seq: EngineSequence) -> int:
        """Copy the blocks admission matched for ``seq`` (its ``prefix_match``) into its slot; the
        tokens restored (0 without a slot cache: the match is only released)."""
        match, seq.prefix_match = seq.prefix_match or PrefixMatch(), None
        if cache is None or seq.kv is None:
            self.release(match)
            return 0
        return self.restore(cache, seq.kv, match, seq.prompt_len)

    def save_from(self, cache: SlotCache | None, seq: EngineSequence, room: int) -> None:
        """Keep ``seq``'s computed prompt and generated tokens' full blocks (see :meth:`save`); a
        failure is logged, never raised (the cache is an optimisation: the request goes on). Drops
        the references of a chain ``seq`` never restored (it failed first)."""
        if seq.prefix_match is not None:
            self.release(seq.prefix_match)
            seq.prefix_match = None
        if cache is None or seq.kv is None or room <= 0:
            return
        try:
            self.save(cache, seq.kv, [*seq.request.prompt_ids, *seq.generated], room)
        except Exception:  # noqa: BLE001
            logger.warning("request %s: keeping its prefix failed", seq.request_id, exc_info=True)


__all__ = ["BLOCK_SIZE", "Block", "PrefixCache", "PrefixMatch", "chain_key", "common_length"]
