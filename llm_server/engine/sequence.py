"""Sequence: one request inside the engine, with an explicit status and its timestamps.

A sequence moves ``WAITING -> PREFILLING -> DECODING -> FINISHED`` (or to ``FINISHED`` from any
earlier status: cancelled, failed, or nothing to generate). :meth:`Sequence.advance` refuses any
other move, and :meth:`Sequence.close` makes finishing idempotent: a second finish is a no-op, so
a request can never get two ``Finished`` events or have its cache released twice.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from llm_server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from llm_server.engine.runner import KVHandle
from llm_server.engine.sampler import SamplerState
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import GenerationRequest


class SeqStatus(enum.Enum):
    """Where a request stands (as transformers' ``RequestStatus``)."""

    WAITING = "waiting"  # queued, holds no cache
    PREFILLING = "prefilling"  # admitted: its prompt is going into the KV cache (maybe in chunks)
    DECODING = "decoding"  # one new token per step
    FINISHED = "finished"  # stream closed, cache released


_ALLOWED: dict[SeqStatus, frozenset[SeqStatus]] = {
    SeqStatus.WAITING: frozenset({SeqStatus.PREFILLING, SeqStatus.FINISHED}),
    SeqStatus.PREFILLING: frozenset({SeqStatus.DECODING, SeqStatus.FINISHED}),
    SeqStatus.DECODING: frozenset({SeqStatus.FINISHED}),
    SeqStatus.FINISHED: frozenset(),
}


@dataclass(eq=False)
class Sequence:
    """A request inside the engine: its stream, text state, cache handle and status."""

    request: GenerationRequest
    stream: GenerationStream
    detok: IncrementalDetokenizer
    stops: StopMatcher
    reserved: int  # prompt + max_new_tokens: the KV budget this request may use
    status: SeqStatus = SeqStatus.WAITING
    times: dict[SeqStatus, float] = field(default_factory=lambda: {SeqStatus.WAITING: time.monotonic()})
    kv: KVHandle | None = None  # set at admission (scheduler thread)
    sampler: SamplerState | None = None  # set at admission (scheduler thread: it may hold tensors)
    matcher: Any = None  # a constrained request's grammar matcher (built in submit, the caller's thread)
    prefilled: int = 0  # prompt tokens already in the KV cache
    cached_tokens: int = 0  # of those, copied from the prefix cache
    prefix_match: Any = None  # the prefix cache's PrefixMatch, held from admission to the copy into the slot
    generated: list[int] = field(default_factory=list)
    drafter: Any = None  # speculative decoding's per-request state (engine/speculative.py); None: it never drafts
    text: list[str] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def advance(self, status: SeqStatus) -> None:
        """Move to ``status``; an illegal move is a bug in the scheduler (AssertionError)."""
        if status not in _ALLOWED[self.status]:
            move = f"{self.status.value} -> {status.value}"
            raise AssertionError(f"request {self.request_id}: {move} is not a legal move")
        self.status = status
        self.times[status] = time.monotonic()

    def close(self) -> bool:
        """Mark the sequence finished; False (and nothing changes) when it already was."""
        if self.finished:
            return False
        self.advance(SeqStatus.FINISHED)
        return True


__all__ = ["SeqStatus", "Sequence"]
