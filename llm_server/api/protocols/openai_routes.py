"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Requests are validated (:mod:`llm_server.api.protocols.openai_wire`), turned into a
:class:`~llm_server.serving.service.ChatOptions`, and opened through ``app.state.chat``
(the ChatService) *before* any response starts, so bad input, an unknown model, a too-long
prompt or a full queue are proper 400/404/503 answers (503 with ``Retry-After`` while the
model loads too). Streams are Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``);
an error after the stream started arrives as a final ``data: {"error": {...}}`` event. A
client that disconnects cancels its generation. Opening, collecting and streaming are
:mod:`llm_server.api.plumbing.turns`, shared with the spec routes; this module only speaks
OpenAI's wire format.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.plumbing.turns import (
    ChatStreamResponse,
    Collected,
    StreamFailure,
    api_error_for,
    collect,
    events,
    open_stream,
)
from llm_server.api.plumbing.errors import APIError
from llm_server.api.plumbing.limits import CLIENT_CLOSED_REQUEST
from llm_server.api.protocols.openai_checks import (
    chat_top_logprobs,
    check_combination,
    completion_top_logprobs,
    request_tools,
)
from llm_server.api.protocols.openai_tool_calls import assistant_calls_text, streamed_deltas, whole_message
from llm_server.api.protocols.openai_wire import (
    SUPPORTED_ROLES,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    unsupported_chat_fields,
    unsupported_completion_fields,
)
from llm_server.api.ops.readiness import ready_chat, ready_engine
from llm_server.api.plumbing.request_context import request_id
from llm_server.engine.types import LogprobLog
from llm_server.serving.service import ChatDelta, ChatDone, ChatOptions, ChatStream, Message
from llm_server.serving.structured import (
    LogprobFormatter,
    constrained,
    response_format_grammar,
    with_logprobs,
)
from llm_server.serving.tools import ToolSet, call_grammar, with_tools_prompt

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])

_SERVER_STARTED = int(time.time())
_SSE_MEDIA_TYPE = "text/event-stream"
#: The serving layer's field names -> this API's.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


# --- errors ----------------------------------------------------------------------------------
def _unsupported(fields: list[str]) -> APIError:
    names = ", ".join(fields)
    return APIError(
        400, f"unsupported parameter(s): {names}; this server does not implement them",
        param=fields[0], code="unsupported_parameter",
    )


def _error_mapper(prompt_param: str) -> Callable[[Exception], APIError]:
    """Serving/engine errors in this API's terms (its field names, the prompt's field)."""
    return partial(api_error_for, context_param=prompt_param, param_names=_PARAM_NAMES)


# --- request -> ChatOptions -------------------------------------------------------------------
def _check_model(request: Request, model: str) -> str:
    served = str(ready_engine(request).model_id)
    if model != served:
        raise APIError(
            404, f"The model `{model}` does not exist. This server serves `{served}`.",
            type="invalid_request_error", param="model", code="model_not_found",
        )
    return served


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


def _chat_messages(body: ChatCompletionRequest) -> list[Message]:
    messages: list[Message] = []
    for i, msg in enumerate(body.messages):
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
            text = "\n".join(t for t in (text, assistant_calls_text(i, extra)) if t)
        messages.append({"role": role, "content": text})
    return messages


# --- responses --------------------------------------------------------------------------------
def _finish_reason(done: ChatDone, called: bool = False) -> str:
    if called:
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def _usage(done: ChatDone) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


@dataclass(frozen=True)
class _Reply:
    """How one answer is written: a chat completion or a text completion, whole or in chunks."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = 0
    logprobs: LogprobLog | None = None  # recorded by the engine when the request asked for them
    formatter: LogprobFormatter | None = None
    tools: ToolSet | None = None  # the reply may hold tool calls

    @classmethod
    def new(cls, chat: bool, model: str, body: SamplingFields, logprobs: LogprobLog | None = None,
            formatter: LogprobFormatter | None = None) -> _Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        return cls(chat, model, include_usage, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), logprobs,
                   formatter)

    def _logprobs(self) -> dict[str, Any] | None:
        """The log-probabilities recorded since the last call (None when not requested)."""
        if self.logprobs is None or self.formatter is None:
            return None
        items = self.logprobs.drain()
        return self.formatter.chat(items) if self.chat else self.formatter.completion(items)

    def _envelope(self, streamed: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        kind += ".chunk" if streamed and self.chat else ""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, collected: Collected) -> dict[str, Any]:
        done = collected.done
        called = False
        if self.chat:
            message, called = whole_message(collected.text, self.tools)
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": collected.text}
        choice.update(logprobs=self._logprobs(), finish_reason=_finish_reason(done, called))
        return {**self._envelope(False), "choices": [choice], "usage": _usage(done), "system_fingerprint": None}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": delta.get("content", "")}
        choice.update(logprobs=self._logprobs() if delta.get("content") else None, finish_reason=finish)
        out = {**self._envelope(True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, done: ChatDone) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": _usage(done)}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _sse_events(stream: ChatStream, reply: _Reply,
                      to_api_error: Callable[[Exception], APIError]) -> AsyncIterator[str]:
    """SSE body: (chat) a role chunk, one chunk per delta, the finish chunk, usage, [DONE];
    or, after a failure, a final error event instead of the finish."""
    if reply.chat:
        yield _sse(reply.chunk({"role": "assistant", "content": ""}))
    held: list[str] = []  # a reply that may hold tool calls is sent once it is complete
    async with aclosing(events(stream)) as items:
        async for item in items:
            if isinstance(item, ChatDelta):
                if reply.tools is None:
                    yield _sse(reply.chunk({"content": item.text}))
                else:
                    held.append(item.text)
            elif isinstance(item, StreamFailure):
                yield _sse(to_api_error(item.error).body())
            elif isinstance(item, ChatDone):
                called = False
                if reply.tools is not None:
                    deltas, called = streamed_deltas("".join(held), reply.tools)
                    for delta in deltas:
                        yield _sse(reply.chunk(delta))
                yield _sse(reply.chunk({}, _finish_reason(item, called)))
                if reply.include_usage:
                    yield _sse(reply.usage_chunk(item))
                yield _sse("[DONE]")


async def _answer(request: Request, opener: Callable[[], ChatStream], reply: _Reply, streamed: bool,
                  prompt_param: str) -> Response:
    """Open the stream (errors -> HTTP errors), then answer it whole or as SSE."""
    to_api_error = _error_mapper(prompt_param)
    stream = await open_stream(request, opener, to_api_error)
    if streamed:
        return ChatStreamResponse(_sse_events(stream, reply, to_api_error), stream, media_type=_SSE_MEDIA_TYPE)
    collected = await collect(request, stream, to_api_error)
    if collected is None:  # the client left; its generation was cancelled
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(reply.whole(collected))


# --- endpoints --------------------------------------------------------------------------------
@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    _check_model(request, model)
    return _model_card(request)


def _model_card(request: Request) -> dict[str, Any]:
    engine = ready_engine(request)
    card: dict[str, Any] = {"id": str(engine.model_id), "object": "model", "created": _SERVER_STARTED,
                            "owned_by": "llm_server"}
    max_context = getattr(engine, "max_context", None)
    if isinstance(max_context, int):
        card["max_model_len"] = max_context
    return card


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    bad = unsupported_chat_fields(body)
    if bad:
        raise _unsupported(bad)
    model = _check_model(request, body.model)
    chat = ready_chat(request)
    role = body.role or ("assistant" if body.improvement else None)  # the pipeline uses roles anyway
    messages = _chat_messages(body)
    max_tokens = body.requested_max_tokens()
    params, log = with_logprobs(body.sampling_params(request.app.state.settings.default_params, max_tokens),
                                chat_top_logprobs(body))
    options = ChatOptions(
        role=role or "assistant",
        improvement=body.improvement,
        intermediate_steps=body.intermediate_steps,
        params=params,
        request_id=request_id(request),
        fit_context=max_tokens is None,  # the default budget shrinks to the room the prompt leaves
    )
    check_combination(body.response_format, log, body.improvement)
    tools = request_tools(body, chat)
    if tools is not None:
        messages = with_tools_prompt(messages, tools)
    logger.info("chat completion: %d messages, stream=%s, improvement=%s, tools=%s", len(messages), body.stream,
                body.improvement, tools.choice if tools else None)

    def opener() -> ChatStream:  # runs in a worker thread: grammars are compiled there
        if tools is not None and tools.constrained:
            grammar = call_grammar(chat.engine.tokenizer, tools)
        else:
            grammar = response_format_grammar(chat.engine.tokenizer, body.response_format)
        structured = replace(options, params=constrained(options.params, grammar))
        return chat.open(chat.openai_messages(messages, role), structured)

    reply = replace(_Reply.new(True, model, body, log, _formatter(chat, log)), tools=tools)
    return await _answer(request, opener, reply, body.stream, "messages")


def _formatter(chat: Any, log: LogprobLog | None) -> LogprobFormatter | None:
    return None if log is None else LogprobFormatter(chat.engine.tokenizer)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    bad = unsupported_completion_fields(body)
    if bad:
        raise _unsupported(bad)
    model = _check_model(request, body.model)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt",
                           code="unsupported_value")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "prompt must be a non-empty string", param="prompt")
    params, log = with_logprobs(body.sampling_params(request.app.state.settings.default_params, body.max_tokens),
                                completion_top_logprobs(body))
    options = ChatOptions(params=params, request_id=request_id(request), fit_context=body.max_tokens is None)
    chat = ready_chat(request)

    def opener() -> ChatStream:  # runs in a worker thread: the grammar is compiled there
        grammar = response_format_grammar(chat.engine.tokenizer, body.response_format)
        return chat.open_completion(prompt, replace(options, params=constrained(options.params, grammar)))

    reply = _Reply.new(False, model, body, log, _formatter(chat, log))
    return await _answer(request, opener, reply, body.stream, "prompt")
