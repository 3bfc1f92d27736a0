"""Plain data types shared by the engine and its callers (no torch, no HTTP)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from llm_server.helper_functionality.config_models import GENERATION_DEFAULTS

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


class InvalidRequest(EngineError):
    """The request itself is malformed (an empty prompt, token ids outside the vocabulary): HTTP 400."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``temperature == 0`` or ``do_sample=False`` is greedy.

    ``max_new_tokens``, ``temperature`` and ``do_sample`` default to the generation defaults
    (:data:`~llm_server.helper_functionality.config_models.GENERATION_DEFAULTS`, defined once);
    ``top_p`` and ``repetition_penalty`` default to 1.0, which turns them off (as do the 0
    defaults of the penalties and ``min_p``, and an empty ``logit_bias``): the serving layer
    fills a request's unset fields with the configured defaults before it reaches the engine.
    """

    max_new_tokens: int = GENERATION_DEFAULTS.max_new_tokens
    temperature: float = GENERATION_DEFAULTS.temperature
    top_p: float = 1.0
    do_sample: bool = GENERATION_DEFAULTS.do_sample
    repetition_penalty: float = 1.0
    #: OpenAI's penalties over the ids generated so far: the logit drops by
    #: ``presence_penalty * [count > 0] + frequency_penalty * count`` (0: off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: ``(token_id, bias)`` pairs added to the logits before anything else (bias in [-100, 100]).
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: None: the engine's default top-k (the model's, as ``model.generate``); 0: off; k > 0: keep k.
    top_k: int | None = None
    #: Drop ids whose probability is below ``min_p`` times the likeliest one's (0: off).
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: Grammar-constrained decoding (an ``engine.constraints.Grammar``); None: free text.
    constraint: Any = field(default=None, compare=False)
    #: None: no log-probabilities; n >= 0: record each token's, with its n likeliest alternatives,
    #: into ``logprob_sink``.
    logprobs: int | None = None
    logprob_sink: LogprobLog | None = field(default=None, compare=False)
    #: Also record every prompt token's log-probability (with ``logprobs`` alternatives) into
    #: ``logprob_sink`` (:meth:`LogprobLog.prompt`), at admission: OpenAI's ``echo`` with ``logprobs``.
    prompt_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One id's log-probability under the model, and the likeliest alternatives (None, and no
    alternatives: a prompt's first id, which nothing before it predicts)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class LogprobLog:
    """Per-request record of :class:`TokenLogprob`: the engine appends, the server drains."""

    def __init__(self) -> None:
        self._items: list[TokenLogprob] = []
        self._prompt: list[TokenLogprob] | None = None
        self._lock = threading.Lock()

    def set_prompt(self, items: list[TokenLogprob]) -> None:
        with self._lock:
            self._prompt = items

    def prompt(self) -> list[TokenLogprob] | None:
        """The prompt's ids and log-probabilities (``SamplingParams.prompt_logprobs``); None until recorded."""
        with self._lock:
            return self._prompt

    def append(self, item: TokenLogprob) -> None:
        with self._lock:
            self._items.append(item)

    def drain(self) -> list[TokenLogprob]:
        """Everything recorded since the last drain."""
        with self._lock:
            items, self._items = self._items, []
        return items


@dataclass
class GenerationRequest:
    """One sequence to generate: already-tokenized prompt and its sampling settings."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    #: Token ids the output will likely repeat (OpenAI's Predicted Outputs, a revision's previous
    #: answer): drafts for speculative decoding (engine/speculative.py); None: no prediction.
    prediction: tuple[int, ...] | None = None


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
    #: When the request entered each status it went through (``waiting``, ``prefilling``,
    #: ``decoding``, ``finished``), in ``time.monotonic()`` seconds; empty when not tracked.
    timeline: dict[str, float] = field(default_factory=dict, compare=False)
    #: Prompt tokens whose KV came from the prefix cache (not prefilled): OpenAI's
    #: ``usage.prompt_tokens_details.cached_tokens``.
    cached_tokens: int = 0
    #: Speculative decoding: draft tokens the model confirmed / refused (OpenAI's
    #: ``usage.completion_tokens_details.accepted_prediction_tokens`` / ``rejected_prediction_tokens``).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


StreamEvent = TextDelta | Finished


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /health and /metrics."""

    waiting: int
    running: int
    healthy: bool
    ready: bool
    #: Seconds a new request is expected to wait before it starts (engine/admission.py; 0: unknown).
    expected_wait_s: float = 0.0
    #: Prefix cache, cumulative since start, in prompt tokens (vLLM's counter names): tokens
    #: looked up, and tokens served from the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    #: Tokens the prefix cache holds now.
    prefix_cache_tokens: int = 0
    #: Speculative decoding, cumulative since start: draft tokens proposed, and accepted.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    #: Grammar-forced ids accepted in speculative steps (not counted in the two above).
    spec_forced_tokens: int = 0
