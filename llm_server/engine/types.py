"""Plain data types shared by the engine and its callers (no torch, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


class EngineError(RuntimeError):
    """Generation of one request failed; other requests are unaffected."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the caller should retry later (HTTP 503 + Retry-After)."""

    def __init__(self, message: str = "server is overloaded", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(EngineError):
    """The engine is loading, draining, or died of a fatal error (HTTP 503)."""


class ContextLengthExceeded(EngineError):
    """Prompt plus requested new tokens do not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
        super().__init__(
            f"this model's maximum context length is {max_context} tokens; the prompt has "
            f"{prompt_tokens} tokens and {max_new_tokens} new tokens were requested"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_context = max_context


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``temperature == 0`` or ``do_sample=False`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    do_sample: bool = True
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0.0


@dataclass
class GenerationRequest:
    """One sequence to generate: already-tokenized prompt and its sampling settings."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TextDelta:
    """New text for one request (UTF-8 safe: never half a character)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Last event of a stream."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str


StreamEvent = TextDelta | Finished


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /health and /metrics."""

    waiting: int
    running: int
    healthy: bool
    ready: bool
