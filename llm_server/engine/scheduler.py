"""Scheduler: decides what the next step runs; it never runs the model.

It owns the three queues (waiting, prefilling, decoding; a sequence's ``status`` always names the
queue that holds it) and answers two questions per iteration:

- :meth:`Scheduler.admit`: which waiting requests join the batch. Admission is FIFO and bounded
  by the KV-cache budget (``running x longest reservation <= max_total_tokens``, a reservation
  being prompt + max_new_tokens) and by ``max_running``, the batch size past which a bigger
  step stops paying (see docs/engine.md). With a prefix cache, its cached tokens share that
  budget: admission first takes a reference on the blocks the request's prompt matches
  (:meth:`~.prefix_cache.PrefixCache.acquire`), then evicts unreferenced blocks, least recently
  used first, until reservations + cached tokens fit (a request alone always runs: then the cache
  gives up everything it must). A request waits while one still prefilling shares at least half
  of its prompt beyond what is cached (its blocks are cached once that prefill ends: sixteen users
  arriving together with one system prompt compute it once, not sixteen times);
- :meth:`Scheduler.schedule_prefill` / :meth:`Scheduler.schedule_decode`: what the step's two
  forwards run: one prefill group (several short prompts together, or one chunk of a long
  prompt), then every decoding sequence (those whose prefill just completed included). While
  sequences decode, the prefill group is bounded by the step token budget (``step_token_budget``
  minus the decode rows), so a long prompt joins the running batch in chunks and the running
  streams' step stays short.

Applying a step's output (sampling, text, finishing) is the engine's job
(:mod:`llm_server.engine.batch_engine`); the scheduler only moves sequences between queues.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from llm_server.engine.config import EngineConfig
from llm_server.engine.prefix_cache import PrefixMatch
from llm_server.engine.sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from llm_server.engine.prefix_cache import PrefixCache


class Scheduler:
    """The engine's queues and its admission / batching policy (no torch, no threads)."""

    def __init__(self, config: EngineConfig, prefix: PrefixCache | None = None) -> None:
        self.config = config
        self.prefix = prefix  # set by the engine once its runner is known (None: no prefix caching)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into the batch (FIFO) while slots and the KV budget allow; each
        admitted one holds its matched prefix blocks in ``prefix_match``."""
        admitted: list[Sequence] = []
        while self.waiting and self.running < self.config.max_running:
            seq = self.waiting[0]
            need = (self.running + 1) * max([seq.reserved, *(s.reserved for s in (*self.prefilling, *self.decoding))])
            if self.running and need > self.config.max_total_tokens:
                break
            match = self._make_room(seq, need)
            if match is None:
                break
            self.waiting.popleft()
            seq.prefix_match = match
            seq.advance(SeqStatus.PREFILLING)
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def _make_room(self, seq: Sequence, need: int) -> PrefixMatch | None:
        """Evict cached blocks until ``need`` reserved tokens fit beside the cache; what ``seq``
        reuses, or None when referenced blocks leave too little room (wait a step)."""
        if self.prefix is None:
            return PrefixMatch()
        match = self.prefix.acquire(seq.request.prompt_ids)
        if self._sharer_prefilling(seq, match.tokens):
            self.prefix.release(match)
            return None
        # a block shared in part is given up before waiting for room to reuse a few tokens of it
        if self._evicted_for(need) or (self.prefix.drop_tail(match) and self._evicted_for(need)):
            return match
        self.prefix.release(match)
        if self.running:
            return None
        self.prefix.evict(self.prefix.tokens)  # alone: it runs, from scratch if need be
        return PrefixMatch()

    def _evicted_for(self, need: int) -> bool:
        """Evict unreferenced cached blocks until ``need`` reserved tokens fit beside the cache; whether they do."""
        assert self.prefix is not None
        over = need + self.prefix.tokens - self.config.max_total_tokens
        return over <= 0 or self.prefix.evict(over) >= over

    def _sharer_prefilling(self, seq: Sequence, cached: int) -> bool:
        """Whether a request still prefilling shares at least half of ``seq``'s prompt (counted in whole
        blocks, the unit the cache saves) beyond the ``cached`` tokens: then ``seq`` is better off
        waiting for its blocks."""
        assert self.prefix is not None
        size, ids = self.prefix.block_size, seq.request.prompt_ids
        usable = (len(ids) - 1) // size * size
        for other in self.prefilling:
            theirs, common = other.request.prompt_ids, 0
            while common < usable and ids[common : common + size] == theirs[common : common + size]:
                common += size
            gain = common - cached
            if gain >= size and 2 * gain >= len(ids):
                return True
        return False

    def reserved_tokens(self) -> int:
        """The KV budget the running sequences hold: running x longest reservation."""
        running = (*self.prefilling, *self.decoding)
        return len(running) * max((s.reserved for s in running), default=0)

    def cancelled(self) -> list[Sequence]:
        """Every queued or running sequence whose consumer has gone (still in its queue)."""
        return [s for s in (*self.waiting, *self.prefilling, *self.decoding) if s.stream.cancelled]

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queue its status names (no-op once finished)."""
        if seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.PREFILLING and seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq.status is SeqStatus.DECODING and seq in self.decoding:
            self.decoding.remove(seq)

    def take_all(self) -> list[Sequence]:
        """Empty every queue; the sequences that were in them."""
        pending = [*self.prefilling, *self.decoding, *self.waiting]
        self.waiting.clear()
        self.prefilling.clear()
        self.decoding.clear()
        return pending

    def schedule_decode(self) -> list[Sequence]:
        """The decode batch: every decoding sequence."""
        return list(self.decoding)

    def schedule_prefill(self) -> list[tuple[Sequence, list[int]]]:
        """The prefill group: prompts (with the ids still to prefill) that fit the step's prefill
        tokens together, padding included, or one chunk of a long prompt. The step's prefill tokens
        are ``prefill_chunk_tokens``, bounded while sequences decode by what ``step_token_budget``
        leaves beside their decode rows (:meth:`EngineConfig.prefill_tokens_beside`)."""
        if not self.prefilling:
            return []
        budget = self.config.prefill_tokens_beside(len(self.decoding))
        first = self.prefilling[0]
        remaining = list(first.request.prompt_ids[first.prefilled :])
        if len(remaining) >= budget:
            return [(first, remaining[:budget])]
        group = [(first, remaining)]
        longest = len(remaining)
        for seq in self.prefilling[1:]:
            ids = list(seq.request.prompt_ids[seq.prefilled :])
            if (len(group) + 1) * max(longest, len(ids)) > budget:
                break
            group.append((seq, ids))
            longest = max(longest, len(ids))
        return group

    def prefilled(self, seq: Sequence, count: int) -> bool:
        """Record ``count`` more prompt tokens in the cache; True (and now decoding) when the
        whole prompt is in."""
        seq.prefilled += count
        if seq.prefilled < seq.prompt_len:
            return False
        self.prefilling.remove(seq)
        seq.advance(SeqStatus.DECODING)
        self.decoding.append(seq)
        return True


__all__ = ["Scheduler"]
