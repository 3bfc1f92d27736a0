"""The abstract engine the serving layer depends on (the real one batches; tests may fake it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from llm_server.engine.arrivals import Arrival, Arrivals
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import EngineStats, GenerationRequest


class Engine(ABC):
    """Owns a model; runs submitted requests and streams their text back.

    Contract:
    - ``submit`` never blocks on generation. It raises ``EngineOverloaded`` when the waiting
      queue is full, ``EngineUnavailable`` when not ready / draining / dead, and
      ``ContextLengthExceeded`` when prompt + max_new_tokens exceed ``max_context``.
    - Errors during generation arrive through the stream (raised on iteration) and fail only
      that request. A fatal error fails every pending request and makes ``stats().healthy``
      False.
    - Cancelled streams leave the batch at the next step and free their cache.
    """

    #: Hugging Face tokenizer (chat template, encode/decode). Not a torch object.
    tokenizer: Any
    #: The served model's id, as shown by /v1/models.
    model_id: str
    #: Maximum prompt + generated tokens per sequence.
    max_context: int

    @abstractmethod
    def start(self) -> None:
        """Start the scheduler thread; ``stats().ready`` becomes True."""

    @abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue a request and return its stream."""

    #: Requests announced by :meth:`arriving` (None: this engine does not wait for them).
    _arrivals: Arrivals | None = None

    def arriving(self) -> Arrival:
        """Announce a request that is coming (done once it is submitted or refused): an engine with
        ``_arrivals`` holds an idle admission until the announced requests are queued, to admit a
        burst together (:mod:`~llm_server.engine.arrivals`)."""
        return Arrival(self._arrivals)

    @abstractmethod
    def stats(self) -> EngineStats:
        """Current queue sizes and health."""

    @abstractmethod
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish up to ``timeout_s``, then stop."""
