"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Requests are validated (:mod:`llm_server.api.protocol_openai`), turned into a
:class:`~llm_server.serving.chat.ChatOptions`, and opened through ``app.state.chat``
(the ChatService) *before* any response starts, so bad input, an unknown model, a too-long
prompt or a full queue are proper 400/404/503 answers. Streams are Server-Sent Events
(``data: {chunk}`` ... ``data: [DONE]``); an error after the stream started arrives as a
final ``data: {"error": {...}}`` event. A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_server.api.auth import require_api_key
from llm_server.api.errors import APIError
from llm_server.api.protocol_openai import (
    SUPPORTED_ROLES,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    unsupported_chat_fields,
    unsupported_completion_fields,
)
from llm_server.engine.types import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    SamplingParams,
)
from llm_server.serving.chat import ChatDelta, ChatDone, ChatInputError, ChatOptions, Message
from llm_server.serving.metrics import InstrumentedChatStream, instrument

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])

_UNAVAILABLE_RETRY_AFTER_S = 5
_SERVER_STARTED = int(time.time())


# --- errors ----------------------------------------------------------------------------------
def api_error_for(exc: Exception) -> APIError:
    """Map a serving/engine exception to the OpenAI-shaped HTTP error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ChatInputError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineOverloaded):
        return APIError(
            503, str(exc), code="server_overloaded", headers={"Retry-After": str(max(1, exc.retry_after_s))}
        )
    if isinstance(exc, EngineUnavailable):
        return APIError(
            503, str(exc) or "the model is not available", code="model_unavailable",
            headers={"Retry-After": str(_UNAVAILABLE_RETRY_AFTER_S)},
        )
    if isinstance(exc, EngineError):
        return APIError(500, f"generation failed: {exc}", type="server_error", code="generation_failed")
    return APIError(500, "internal server error", type="server_error")


def _unsupported(fields: list[str]) -> APIError:
    names = ", ".join(fields)
    return APIError(
        400, f"unsupported parameter(s): {names}; this server does not implement them",
        param=fields[0], code="unsupported_parameter",
    )


# --- request -> ChatOptions -------------------------------------------------------------------
def _served_model(request: Request) -> str:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "the model is loading", code="model_unavailable",
                       headers={"Retry-After": str(_UNAVAILABLE_RETRY_AFTER_S)})
    return str(engine.model_id)


def _check_model(request: Request, model: str) -> str:
    served = _served_model(request)
    if model != served:
        raise APIError(
            404, f"The model `{model}` does not exist. This server serves `{served}`.",
            type="invalid_request_error", param="model", code="model_not_found",
        )
    return served


def _sampling(request: Request, body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    settings = getattr(request.app.state, "settings", None)
    base: SamplingParams = getattr(settings, "default_params", None) or SamplingParams()
    changes: dict[str, Any] = {}
    if max_tokens is not None:
        changes["max_new_tokens"] = max_tokens
    if body.temperature is not None:
        changes["temperature"] = body.temperature
        changes["do_sample"] = body.temperature > 0.0
    if body.top_p is not None:
        if body.top_p == 0.0:  # only the most likely token survives: that is greedy decoding
            changes["do_sample"] = False
        else:
            changes["top_p"] = body.top_p
    if body.repetition_penalty is not None:
        changes["repetition_penalty"] = body.repetition_penalty
    if body.seed is not None:
        changes["seed"] = body.seed
    stops = body.stop_sequences()
    if stops:
        changes["stop"] = stops
    return replace(base, **changes)


def _message_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    texts: list[str] = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                           param=f"messages.{index}.content", code="unsupported_content")
        texts.append(part.text)
    return "\n".join(texts)


def _chat_messages(body: ChatCompletionRequest) -> list[Message]:
    messages: list[Message] = []
    for i, msg in enumerate(body.messages):
        if msg.role not in SUPPORTED_ROLES:
            raise APIError(400, f"message role {msg.role!r} is not supported (system, user, assistant)",
                           param=f"messages.{i}.role", code="unsupported_role")
        extra = msg.model_extra or {}
        if extra.get("tool_calls") or extra.get("function_call"):
            raise APIError(400, "tool calls are not supported", param=f"messages.{i}.tool_calls",
                           code="unsupported_parameter")
        if msg.content is None and msg.role != "assistant":
            raise APIError(400, "message content is required", param=f"messages.{i}.content")
        role = "system" if msg.role == "developer" else msg.role
        messages.append({"role": role, "content": _message_text(i, msg.content)})
    return messages


def _with_role_prompt(chat: Any, messages: list[Message], role: str | None) -> list[Message]:
    """The ``role`` extension: prepend that role's configured system prompt.

    Only when the client sent no system message of its own (an explicit one wins). Without
    ``role`` nothing is added: a plain OpenAI request gets exactly the messages it sent.
    """
    if role is None:
        return messages
    prompts = getattr(chat, "system_prompts", {})
    if role not in prompts:
        known = ", ".join(sorted(prompts))
        raise APIError(400, f"unknown role {role!r}; known roles: {known}", param="role", code="unknown_role")
    if any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": prompts[role]}, *messages]


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def _started_at(request: Request) -> float | None:
    return getattr(request.state, "started_at", None)


def _chat_service(request: Request) -> Any:
    chat = getattr(request.app.state, "chat", None)
    if chat is None:
        raise APIError(503, "the model is loading", code="model_unavailable",
                       headers={"Retry-After": str(_UNAVAILABLE_RETRY_AFTER_S)})
    return chat


async def _open(opener: Callable[[], Any], request: Request, prompt_param: str) -> InstrumentedChatStream:
    """Open a ChatStream (eager validation + submit), mapping refusals to HTTP errors.

    Opening applies the chat template and tokenizes, so it runs in a worker thread.
    """
    try:
        return instrument(await run_in_threadpool(opener), started_at=_started_at(request))
    except ChatInputError as exc:
        if exc.param == "max_new_tokens":  # the serving layer's name for OpenAI's max_tokens
            exc.param = "max_tokens"
        raise api_error_for(exc) from exc
    except ContextLengthExceeded as exc:
        error = api_error_for(exc)
        error.param = prompt_param
        raise error from exc
    except EngineError as exc:
        raise api_error_for(exc) from exc


# --- responses --------------------------------------------------------------------------------
@dataclass
class _Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _finish_reason(done: ChatDone) -> str:
    return "length" if done.finish_reason == "length" else "stop"


async def _watch_disconnect(request: Request, stream: InstrumentedChatStream) -> None:
    """Cancel ``stream`` when the client goes away (for non-streamed answers)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


async def _collect(request: Request, stream: InstrumentedChatStream) -> _Outcome:
    """Run a stream to its end (a non-streamed answer); errors become HTTP errors."""
    watcher = asyncio.create_task(_watch_disconnect(request, stream))
    parts: list[str] = []
    done: ChatDone | None = None
    try:
        async for event in stream:
            if isinstance(event, ChatDelta):
                parts.append(event.text)
            elif isinstance(event, ChatDone):
                done = event
    except Exception as exc:
        logger.warning("generation failed: %s", exc)
        raise api_error_for(exc) from exc
    finally:
        watcher.cancel()
    if done is None:
        raise APIError(500, "generation ended without a result", type="server_error")
    return _Outcome("".join(parts), _finish_reason(done), done.prompt_tokens, done.completion_tokens)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


ChunkFn = Callable[[dict[str, Any] | None, str | None], dict[str, Any]]
UsageChunkFn = Callable[[dict[str, int]], dict[str, Any]]


async def _sse_events(stream: InstrumentedChatStream, chunk: ChunkFn, first: dict[str, Any] | None,
                      include_usage: bool, usage_chunk: UsageChunkFn) -> AsyncIterator[str]:
    """SSE body: optional first chunk, one chunk per delta, the finish chunk, usage, [DONE]."""
    iterator = stream.__aiter__()
    finished = False
    try:
        if first is not None:
            yield _sse(chunk(first, None))
        done: ChatDone | None = None
        try:
            async for event in iterator:
                if isinstance(event, ChatDelta) and event.text:
                    yield _sse(chunk({"content": event.text}, None))
                elif isinstance(event, ChatDone):
                    done = event
        except Exception as exc:  # the stream already started: report in-band, then stop
            finished = True
            logger.warning("generation failed mid-stream: %s", exc)
            yield _sse(api_error_for(exc).body())
            return
        finished = True
        if done is None:
            yield _sse(APIError(500, "generation ended without a result", type="server_error").body())
            return
        yield _sse(chunk({}, _finish_reason(done)))
        if include_usage:
            outcome = _Outcome("", _finish_reason(done), done.prompt_tokens, done.completion_tokens)
            yield _sse(usage_chunk(outcome.usage()))
        yield _sse("[DONE]")
    finally:
        if not finished:
            stream.cancel()
        await iterator.aclose()


class SSEResponse(StreamingResponse):
    """A streamed response that always closes its body iterator, even when the client left.

    Starlette stops iterating when the client disconnects but leaves the generator to the
    garbage collector; closing it here runs its ``finally`` at once, which cancels the
    generation so the engine frees the slot immediately.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- endpoints --------------------------------------------------------------------------------
@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    _check_model(request, model)
    return _model_card(request)


def _model_card(request: Request) -> dict[str, Any]:
    engine = getattr(request.app.state, "engine", None)
    card: dict[str, Any] = {"id": _served_model(request), "object": "model", "created": _SERVER_STARTED,
                            "owned_by": "llm_server"}
    max_context = getattr(engine, "max_context", None)
    if isinstance(max_context, int):
        card["max_model_len"] = max_context
    return card


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | SSEResponse:
    bad = unsupported_chat_fields(body)
    if bad:
        raise _unsupported(bad)
    model = _check_model(request, body.model)
    chat = _chat_service(request)
    role = body.role or ("assistant" if body.improvement else None)  # the pipeline uses roles anyway
    messages = _with_role_prompt(chat, _chat_messages(body), role)
    options = ChatOptions(
        role=role or "assistant",
        improvement=body.improvement,
        intermediate_steps=body.intermediate_steps,
        params=_sampling(request, body, body.requested_max_tokens()),
        request_id=_request_id(request),
    )
    stream = await _open(lambda: chat.open(messages, options), request, "messages")
    logger.info("chat completion: %d messages, stream=%s, improvement=%s", len(messages), body.stream,
                body.improvement)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        outcome = await _collect(request, stream)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                         "logprobs": None, "finish_reason": outcome.finish_reason}],
            "usage": outcome.usage(), "system_fingerprint": None,
        })
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage}

    events = _sse_events(stream, chunk, {"role": "assistant", "content": ""}, include_usage, usage_chunk)
    return SSEResponse(events, headers=_SSE_HEADERS)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | SSEResponse:
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
    options = ChatOptions(params=_sampling(request, body, body.max_tokens), request_id=_request_id(request))
    chat = _chat_service(request)
    stream = await _open(lambda: chat.open_completion(prompt, options), request, "prompt")
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        outcome = await _collect(request, stream)
        return JSONResponse({
            "id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": outcome.text, "logprobs": None,
                         "finish_reason": outcome.finish_reason}],
            "usage": outcome.usage(), "system_fingerprint": None,
        })
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None,
                         "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                "choices": [], "usage": usage}

    events = _sse_events(stream, chunk, None, include_usage, usage_chunk)
    return SSEResponse(events, headers=_SSE_HEADERS)
