"""The spec's endpoints: /chat/blocking, /chat/stream (POST and GET) and /ping.

- ``POST`` takes a JSON body ``{prompt, history, improvement, intermediate_steps}`` plus
  optional ``role``, ``max_new_tokens``, ``temperature``, ``top_p``; ``GET`` takes the same
  fields as query parameters (``history`` as JSON text) for a browser.
- ``/chat/blocking`` answers ``{"reply": ...}`` (plus the improvement stages with
  ``improvement`` and ``intermediate_steps``).
- ``/chat/stream`` answers ``text/plain`` chunks, then a last chunk ``[[END]]``; a failure
  after the stream started ends it with ``[[ERROR]] <message>`` instead.

The server keeps no conversation state: history comes with every request. Generation
runs on the engine's thread; tokenizing runs in a worker thread, so the event loop (and
``/ping``) never waits on either. A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from llm_server.api.auth import require_api_key
from llm_server.api.errors import APIError
from llm_server.api.protocol_chat import (
    END_MARKER,
    ChatRequest,
    api_error_for,
    blocking_body,
    parse_body,
    parse_query,
    stream_error_line,
)
from llm_server.engine.types import EngineError
from llm_server.serving.chat import ChatDelta, ChatDone, ChatInputError, ChatService
from llm_server.serving.metrics import instrument

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["chat"])

STREAM_MEDIA_TYPE = "text/plain; charset=utf-8"
T = TypeVar("T")



def _inlined_schema() -> dict[str, Any]:
    """ChatRequest's JSON schema with its ``$defs`` inlined (OpenAPI cannot follow local refs)."""
    schema = ChatRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


# The body is parsed by hand (strict JSON, size-checked); this documents it in /docs.
_BODY_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _inlined_schema()}}}
}
_STREAM_DOC: dict[str, Any] = {
    **_BODY_DOC,
    "responses": {"200": {"description": "text chunks, then a last chunk `[[END]]` (or `[[ERROR]] <message>`)",
                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
}


# --- endpoints ----------------------------------------------------------------------------
@router.get("/ping")
async def ping() -> dict[str, str]:
    """Liveness check (answers at once, whatever the engine is doing)."""
    return {"status": "ok"}


@router.post("/chat/blocking", openapi_extra=_BODY_DOC)
async def chat_blocking(request: Request) -> Response:
    return await _blocking(request, parse_body(await request.body()))


@router.get("/chat/blocking")
async def chat_blocking_get(request: Request) -> Response:
    return await _blocking(request, parse_query(request.query_params))


@router.post("/chat/stream", openapi_extra=_STREAM_DOC)
async def chat_stream(request: Request) -> Response:
    return await _streaming(request, parse_body(await request.body()))


@router.get("/chat/stream")
async def chat_stream_get(request: Request) -> Response:
    return await _streaming(request, parse_query(request.query_params))


# --- shared -------------------------------------------------------------------------------
def _chat_service(request: Request) -> ChatService:
    chat = getattr(request.app.state, "chat", None)
    if chat is None:
        raise APIError(503, "the model is loading", code="model_unavailable", headers={"Retry-After": "5"})
    return chat


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


async def _open(request: Request, body: ChatRequest) -> Any:
    """Validate and submit (eagerly): input/capacity problems become HTTP errors here."""
    chat = _chat_service(request)
    settings = request.app.state.settings
    options = body.options(settings.default_params, _request_id(request))
    try:
        messages = chat.spec_messages(body.prompt, body.history_dicts(), body.role)
        stream = await run_in_threadpool(chat.open, messages, options)
    except (ChatInputError, EngineError) as exc:
        raise api_error_for(exc) from exc
    return instrument(stream, started_at=getattr(request.state, "started_at", None))


async def _blocking(request: Request, body: ChatRequest) -> Response:
    stream = await _open(request, body)
    done = await _until_disconnect(request, _collect(stream))
    if done is None:  # the client left; its generation was cancelled
        return Response(status_code=499)
    return JSONResponse(blocking_body(done.result, body.improvement, body.intermediate_steps))


async def _collect(stream: Any) -> ChatDone:
    try:
        async for event in stream:
            if isinstance(event, ChatDone):
                return event
    except (ChatInputError, EngineError) as exc:
        raise api_error_for(exc) from exc
    raise APIError(500, "generation ended without a result", type="server_error")


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it (and its generation): None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            logger.info("client disconnected: generation cancelled")
    if task.cancelled():
        return None
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _streaming(request: Request, body: ChatRequest) -> Response:
    stream = await _open(request, body)
    return StreamingResponse(_stream_chunks(stream), media_type=STREAM_MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_chunks(stream: Any) -> AsyncIterator[str]:
    """Text chunks, then ``[[END]]`` (or ``[[ERROR]] ...`` if generation failed midway).

    Starlette cancels this generator when the client disconnects; leaving the ``async for``
    cancels the generation.
    """
    iterator = stream.__aiter__()
    try:
        async for event in iterator:
            if isinstance(event, ChatDelta) and event.text:
                yield event.text
        yield END_MARKER
    except (ChatInputError, EngineError) as exc:
        logger.warning("stream failed after it started: %s", type(exc).__name__)
        yield stream_error_line(exc)
    except Exception as exc:  # never leave a client with a silently truncated answer
        logger.exception("stream crashed after it started")
        yield stream_error_line(exc)
    finally:
        stream.cancel()
        await iterator.aclose()
