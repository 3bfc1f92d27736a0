"""A scripted Engine for API tests: replies with known text at a known pace.

It honours the Engine contract (overload, cancellation, running counts) without a model,
so HTTP-level behaviour (auth, errors, streaming, disconnects, the page) is tested
deterministically. Engine behaviour itself is tested on a real (tiny) model elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from llm_server.engine.interface import Engine
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import (
    ContextLengthExceeded,
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TextDelta,
)

ReplyFn = Callable[[str], str]  # prompt text -> reply text


class ScriptedEngine(Engine):
    """Replies word by word with ``reply(prompt_text)``, ``delay_s`` between words."""

    def __init__(
        self,
        tokenizer: Any,
        reply: str | ReplyFn = "Hello from the scripted engine.",
        delay_s: float = 0.0,
        max_context: int = 2048,
        max_waiting: int = 64,
        model_id: str = "scripted-model",
    ) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_context = max_context
        self.reply = reply
        self.delay_s = delay_s
        self.max_waiting = max_waiting
        self.fail_with: BaseException | None = None  # set to make the next requests fail
        self.requests: list[GenerationRequest] = []
        self._running = 0
        self._lock = threading.Lock()
        self._ready = False
        self._healthy = True

    def start(self) -> None:
        self._ready = True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self._ready = False

    def kill(self) -> None:
        """Simulate a fatal engine error."""
        self._healthy = False

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(waiting=0, running=self._running, healthy=self._healthy, ready=self._ready)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if not self._ready or not self._healthy:
            raise EngineUnavailable("engine is not ready")
        n_prompt = len(request.prompt_ids)
        if n_prompt + request.params.max_new_tokens > self.max_context:
            raise ContextLengthExceeded(n_prompt, request.params.max_new_tokens, self.max_context)
        with self._lock:
            if self._running >= self.max_waiting:
                raise EngineOverloaded()
            self._running += 1
        self.requests.append(request)
        stream = GenerationStream(request.request_id)
        threading.Thread(target=self._run, args=(request, stream), daemon=True).start()
        return stream

    def _run(self, request: GenerationRequest, stream: GenerationStream) -> None:
        try:
            if self.fail_with is not None:
                stream.push(self.fail_with)
                return
            prompt = self.tokenizer.decode(request.prompt_ids)
            text = self.reply(prompt) if callable(self.reply) else self.reply
            self._emit_words(text, request, stream)
        finally:
            with self._lock:
                self._running -= 1

    def _emit_words(self, text: str, request: GenerationRequest, stream: GenerationStream) -> None:
        words = text.split(" ")
        sent: list[str] = []
        for i, word in enumerate(words[: request.params.max_new_tokens]):
            if stream.cancelled:
                stream.push(Finished("cancelled", len(request.prompt_ids), i, " ".join(sent)))
                return
            piece = word if i == 0 else " " + word
            sent.append(word)
            stream.push(TextDelta(piece))
            if self.delay_s:
                time.sleep(self.delay_s)
        reason = "length" if len(words) > request.params.max_new_tokens else "stop"
        stream.push(Finished(reason, len(request.prompt_ids), len(sent), " ".join(sent)))
