"""Request models of the OpenAI-compatible API, and the checks that refuse what we cannot honour.

Requests are parsed leniently by pydantic (unknown keys are kept in ``model_extra``), then
:func:`unsupported_chat_fields` / :func:`unsupported_completion_fields` list every field
that would change the output but is not implemented (non-zero penalties, ``logit_bias``,
``n > 1``...) and every key we do not know at all; routes answer those with a 400 naming
the field, as OpenAI does, instead of silently ignoring them. Fields that never change the
output (``user``, ``metadata``, ``store``...) are accepted and ignored.

Extension fields (sent by the SDK through ``extra_body``): ``improvement``,
``intermediate_steps`` and ``role`` run the spec's improvement pipeline and role system
prompts; ``repetition_penalty`` maps to the engine's sampling setting. ``response_format``,
``logprobs`` / ``top_logprobs`` and tools are honoured (see docs/structured_output.md).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from llm_server.api.protocol_chat import Integer
from llm_server.engine.types import SamplingParams
from llm_server.serving import sampling
from llm_server.serving.sampling import request_sampling

#: Message roles a chat request may use ("developer" is the newer name of "system").
SUPPORTED_ROLES: frozenset[str] = frozenset({"system", "developer", "user", "assistant", "tool"})
#: Undeclared fields that are accepted and ignored: they never change what is generated.
#: (Declared fields such as ``user`` and ``stream_options`` never reach ``model_extra``.)
IGNORED_FIELDS = frozenset(
    {
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)

MAX_STOP_SEQUENCES = 16


class TextPart(BaseModel):
    """One part of a message's content list; only text parts are supported."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: StrictBool = False
    #: Accepted and ignored (vLLM clients send it); it does not change the output.
    continuous_usage_stats: StrictBool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    stream: StrictBool = False  # strict, as on /chat: "true" (a string) is a 400
    stream_options: StreamOptions | None = None
    max_tokens: Integer | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=sampling.MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: Integer | None = Field(default=None, ge=sampling.MIN_SEED, le=sampling.MAX_SEED)
    n: Integer | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    # extensions
    repetition_penalty: float | None = Field(default=None, ge=sampling.MIN_REPETITION_PENALTY,
                                             le=sampling.MAX_REPETITION_PENALTY)
    top_k: Integer | None = None
    min_p: float | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_max_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed; got {len(value)}")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return tuple(s for s in stops if s)

    def sampling_params(self, defaults: SamplingParams, max_tokens: int | None) -> SamplingParams:
        """The server's ``defaults``, overridden where the request says otherwise (the one rule
        both APIs share: :func:`llm_server.serving.sampling.request_sampling`)."""
        return request_sampling(defaults, max_new_tokens=max_tokens, temperature=self.temperature,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                                stop=self.stop_sequences())


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = Field(default=None, ge=1)
    top_logprobs: Integer | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    # extensions (extra_body)
    improvement: StrictBool = False
    intermediate_steps: StrictBool = False
    role: str | None = None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the new name) wins over ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    response_format: dict[str, Any] | None = None  # extension: as on chat completions
    echo: StrictBool = False
    suffix: str | None = None
    best_of: Integer | None = None


def _common_unsupported(req: SamplingFields) -> list[str]:
    bad: list[str] = []
    if req.n not in (None, 1):
        bad.append("n")
    if req.presence_penalty not in (None, 0.0):
        bad.append("presence_penalty")
    if req.frequency_penalty not in (None, 0.0):
        bad.append("frequency_penalty")
    if req.logit_bias:
        bad.append("logit_bias")
    if req.top_k not in (None, 0, -1):
        bad.append("top_k")
    if req.min_p not in (None, 0.0):
        bad.append("min_p")
    return bad


def _unknown(req: BaseModel) -> list[str]:
    return sorted(k for k in (req.model_extra or {}) if k not in IGNORED_FIELDS)


def unsupported_chat_fields(req: ChatCompletionRequest) -> list[str]:
    """Fields of a chat request that would change the output but are not implemented."""
    bad = _common_unsupported(req)
    if req.functions:
        bad.append("functions")
    if req.function_call not in (None, "none", "auto"):
        bad.append("function_call")
    if req.modalities not in (None, ["text"]):
        bad.append("modalities")
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        if getattr(req, name) is not None:
            bad.append(name)
    return bad + _unknown(req)


def unsupported_completion_fields(req: CompletionRequest) -> list[str]:
    """Fields of a completion request that would change the output but are not implemented."""
    bad = _common_unsupported(req)
    if req.echo:
        bad.append("echo")
    if req.suffix:
        bad.append("suffix")
    if req.best_of not in (None, 1):
        bad.append("best_of")
    return bad + _unknown(req)
