"""Request side of the OpenAI-compatible API: its request models, the checks that refuse what we
cannot honour, and the translation of a request into the serving layer's one
:class:`~llm_server.serving.request.TurnRequest` (:func:`chat_turn`, :func:`completion_turn`).

Requests are parsed leniently by pydantic (unknown keys are kept in ``model_extra``), then
:func:`unsupported_chat_fields` / :func:`unsupported_completion_fields` list every field
that would change the output but is not implemented (``suffix``, ``audio``...)
and every key we do not know at all; routes answer those with a 400 naming
the field, as OpenAI does, instead of silently ignoring them. Fields that never change the
output (``user``, ``metadata``, ``store``...) are accepted and ignored.

Extension fields (sent by the SDK through ``extra_body``): ``improvement``,
``intermediate_steps`` and ``role`` run the spec's improvement pipeline and role system
prompts; ``repetition_penalty``, ``top_k`` and ``min_p`` map to the engine's sampling settings
(as ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` do). ``response_format``,
``logprobs`` / ``top_logprobs`` and tools are honoured (see docs/structured_output.md).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.spec_chat_wire import Integer
from llm_server.serving import sampling
from llm_server.serving.request import Message, Sampling, ToolRequest, TurnRequest
from llm_server.serving.structured import MAX_TOP_LOGPROBS
from llm_server.serving.tools import call_text

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
#: The most choices (``n``) one request may ask for; each is a turn of its own in the engine.
MAX_CHOICES = 16


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
    n: Integer | None = Field(default=None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    # extensions
    repetition_penalty: float | None = Field(default=None, ge=sampling.MIN_REPETITION_PENALTY,
                                             le=sampling.MAX_REPETITION_PENALTY)
    top_k: Integer | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
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

    def sampling(self, max_tokens: int | None) -> Sampling:
        """What the client asked for; what it left out is the server's default (serving applies it)."""
        return Sampling(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                        repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop_sequences(),
                        presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                        logit_bias=self.bias_pairs(), top_k=self.top_k, min_p=self.min_p)

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs; a key that is no token id is a 400 naming it."""
        pairs: list[tuple[int, float]] = []
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise APIError(400, f"logit_bias key {key!r} is not a token id (a non-negative integer)",
                               param=f"logit_bias.{key}", code="invalid_value")
            if not -sampling.MAX_LOGIT_BIAS <= value <= sampling.MAX_LOGIT_BIAS:
                raise APIError(400, f"logit_bias value for {key} must be between -100 and 100; got {value}",
                               param=f"logit_bias.{key}", code="invalid_value")
            pairs.append((int(key), float(value)))
        return tuple(pairs)


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
    #: Candidates generated to return the ``n`` likeliest (cumulative log-probability); not streamable.
    best_of: Integer | None = Field(default=None, ge=1, le=MAX_CHOICES)

    def check_best_of(self) -> None:
        """``best_of`` as OpenAI allows it: at least ``n``, and never streamed (else a 400 naming it)."""
        if self.best_of is None:
            return
        if self.best_of < (self.n or 1):
            raise APIError(400, f"best_of must be at least n; got best_of={self.best_of}, n={self.n}",
                           param="best_of", code="invalid_value")
        if self.stream and self.best_of > 1:
            raise APIError(400, "best_of cannot be streamed: the best candidates are known only at the end",
                           param="best_of", code="invalid_value")


def _common_unsupported(req: SamplingFields) -> list[str]:
    return []


def _unknown(req: BaseModel) -> list[str]:
    return sorted(k for k in (req.model_extra or {}) if k not in IGNORED_FIELDS)


def unsupported_chat_fields(req: ChatCompletionRequest) -> list[str]:
    """Fields of a chat request that would change the output but are not implemented."""
    bad = _common_unsupported(req)
    if req.modalities not in (None, ["text"]):
        bad.append("modalities")
    for name in ("audio", "reasoning_effort", "web_search_options"):
        if getattr(req, name) is not None:
            bad.append(name)
    return bad + _unknown(req)


def unsupported_completion_fields(req: CompletionRequest) -> list[str]:
    """Fields of a completion request that would change the output but are not implemented."""
    bad = _common_unsupported(req)
    if req.suffix:
        bad.append("suffix")
    return bad + _unknown(req)


# --- request -> TurnRequest ------------------------------------------------------------------
def chat_turn(body: ChatCompletionRequest, request_id: str) -> TurnRequest:
    """A chat completion request in the serving layer's terms (400 for what it cannot say)."""
    tools = _legacy_functions(body)
    if body.tools is not None or body.tool_choice is not None:
        tools = ToolRequest(body.tools, body.tool_choice, (body.model_extra or {}).get("parallel_tool_calls"))
    return TurnRequest(
        request_id=request_id,
        messages=tuple(chat_messages(body.messages)),
        role=body.role or ("assistant" if body.improvement else None),  # the pipeline uses roles anyway
        sampling=body.sampling(body.requested_max_tokens()),
        response_format=body.response_format,
        tools=tools,
        logprobs=chat_top_logprobs(body),
        improvement=body.improvement,
        intermediate_steps=body.intermediate_steps,
        prediction=_prediction(body.prediction),
    )


def _prediction(value: Any) -> str | None:
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": str | [text parts]}`` (400 otherwise)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "content" or "content" not in value:
        raise APIError(400, 'prediction must be {"type": "content", "content": ...}', param="prediction",
                       code="invalid_value")
    content = value["content"]
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, "prediction.content must be a string or a list of text parts",
                       param="prediction.content", code="invalid_value")
    return content


def _legacy_functions(body: ChatCompletionRequest) -> ToolRequest | None:
    """The legacy ``functions`` / ``function_call`` as tools (one call at most, as OpenAI made them)."""
    if body.functions is None and body.function_call is None:
        return None
    if body.tools is not None or body.tool_choice is not None:
        raise APIError(400, "send either tools/tool_choice or the legacy functions/function_call, not both",
                       param="functions", code="invalid_value")
    if not body.functions:
        raise APIError(400, "function_call needs functions", param="function_call", code="invalid_value")
    call = body.function_call
    if isinstance(call, dict) and isinstance(call.get("name"), str):
        choice: Any = {"type": "function", "function": {"name": call["name"]}}
    elif call in (None, "auto", "none"):
        choice = call
    else:
        raise APIError(400, "function_call must be none, auto or {'name': ...}", param="function_call",
                       code="invalid_value")
    return ToolRequest([{"type": "function", "function": f} for f in body.functions], choice, False)


def completion_turn(body: CompletionRequest, request_id: str) -> TurnRequest:
    """A (legacy) completion request in the serving layer's terms: one raw prompt."""
    body.check_best_of()
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt",
                           code="unsupported_value")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "prompt must be a non-empty string", param="prompt")
    logprobs = completion_top_logprobs(body)
    return TurnRequest(request_id=request_id, prompt=prompt, sampling=body.sampling(body.max_tokens),
                       response_format=body.response_format, logprobs=logprobs,
                       prompt_logprobs=body.echo and logprobs is not None)


def chat_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """None: no logprobs; else how many alternatives per token (``top_logprobs``)."""
    if body.logprobs not in (None, False, True):
        raise APIError(400, "logprobs must be a boolean", param="logprobs", code="invalid_value")
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs",
                       code="invalid_value")
    if not body.logprobs:
        if top:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                           code="invalid_value")
        return None
    return top or 0


def completion_top_logprobs(body: CompletionRequest) -> int | None:
    value = body.logprobs
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}", param="logprobs",
                       code="invalid_value")
    return value


def _message_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    texts: list[str] = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                           param=f"messages.{index}.content", code="unsupported_content")
        if part.text is None:
            where = f"messages.{index}.content.{j}.text"
            raise APIError(400, f"{where} is required: a text part needs its text", param=where,
                           code="missing_field")
        texts.append(part.text)
    return "\n".join(texts)


def chat_messages(wire: list[ChatMessage]) -> list[Message]:
    """Chat messages in the serving layer's terms (400 naming ``messages.N...`` for what cannot be said)."""
    messages: list[Message] = []
    for i, msg in enumerate(wire):
        if msg.role not in SUPPORTED_ROLES:
            raise APIError(400, f"message role {msg.role!r} is not supported ({', '.join(sorted(SUPPORTED_ROLES))})",
                           param=f"messages.{i}.role", code="unsupported_role")
        extra = msg.model_extra or {}
        calls = extra.get("tool_calls") or extra.get("function_call")
        if ("tool_calls" in extra or "function_call" in extra) and msg.role != "assistant":
            raise APIError(400, "only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls",
                           code="invalid_value")
        if msg.content is None and msg.role != "assistant":
            raise APIError(400, "message content is required", param=f"messages.{i}.content")
        role = "system" if msg.role == "developer" else msg.role
        text = _message_text(i, msg.content)
        if calls:
            text = "\n".join(t for t in (text, _assistant_calls_text(i, extra)) if t)
        messages.append({"role": role, "content": text})
    return messages


def _assistant_calls_text(index: int, extra: dict[str, Any]) -> str:
    """An assistant message's ``tool_calls`` rendered as the model writes calls."""
    calls = extra.get("tool_calls")
    if extra.get("function_call"):
        calls = [{"type": "function", "function": extra["function_call"]}]
    if not isinstance(calls, list):
        raise APIError(400, "tool_calls must be a list", param=f"messages.{index}.tool_calls", code="invalid_value")
    texts: list[str] = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, "each tool call needs function.name", param=f"messages.{index}.tool_calls.{j}",
                           code="invalid_value")
        texts.append(call_text(function["name"], function.get("arguments", "{}")))
    return "\n".join(texts)
