"""The spec's endpoints: /chat/blocking, /chat/stream (POST and GET) and /ping.

- ``POST`` takes a JSON body ``{prompt, history, improvement, intermediate_steps}`` plus
  optional ``role``, ``max_new_tokens``, ``temperature``, ``top_p`` and ``response_format``
  (as on the OpenAI API: the reply is held to JSON / a JSON schema); ``GET`` takes the same
  fields as query parameters (``history`` as JSON text) for a browser.
- ``/chat/blocking`` answers ``{"reply": ...}`` (plus the improvement stages with
  ``improvement`` and ``intermediate_steps``).
- ``/chat/stream`` answers ``text/plain`` chunks, then a last chunk ``[[END]]``; a failure
  after the stream started ends it with ``[[ERROR]] <message>`` instead.

The server keeps no conversation state: history comes with every request. Generation
runs on the engine's thread; tokenizing runs in a worker thread, so the event loop (and
``/ping``) never waits on either. A client that disconnects cancels its generation
(opening, collecting and streaming are :mod:`llm_server.api.protocols.turns`, shared with the
OpenAI routes). While the model loads, the chat endpoints answer 503 with ``Retry-After``.
The request becomes one :class:`~llm_server.serving.request.TurnRequest` (``ChatRequest.turn``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from llm_server.api.ops.readiness import not_ready_error, readiness
from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.plumbing.limits import CLIENT_CLOSED_REQUEST
from llm_server.api.plumbing.request_context import request_id
from llm_server.api.protocols.spec_chat_wire import (
    END_MARKER,
    ChatRequest,
    blocking_body,
    parse_body,
    parse_query,
    stream_error_line,
)
from llm_server.api.protocols.turns import StreamFailure, Turn, TurnResponse, collect, events, open_turn
from llm_server.serving.turn_stream import ChatDelta, ChatDone

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["chat"])

STREAM_MEDIA_TYPE = "text/plain; charset=utf-8"


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
@router.get("/ping", response_model=None)
async def ping(request: Request) -> Response:
    """The spec's health check: ``{"status": "ok"}`` once the model can answer (at once, whatever
    the engine is doing); while the model loads 503 ``{"status": "loading"}`` with ``Retry-After``
    (``"error"`` if the load failed), so a client that waits for a 200 can then chat."""
    error = not_ready_error(request.app)
    if error is None:
        return JSONResponse({"status": "ok"})
    status = "error" if readiness(request.app).failed else "loading"
    return JSONResponse({"status": status, "message": error.message}, status_code=503, headers=error.headers)


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
async def _open(request: Request, body: ChatRequest) -> Turn:
    """Validate and submit (eagerly): input/capacity problems become HTTP errors here."""
    return await open_turn(request, body.turn(request_id(request)))


async def _blocking(request: Request, body: ChatRequest) -> Response:
    collected = await collect(request, await _open(request, body))
    if collected is None:  # the client left; its generation was cancelled
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(blocking_body(collected.done.result, body.improvement, body.intermediate_steps))


async def _streaming(request: Request, body: ChatRequest) -> Response:
    turn = await _open(request, body)
    return TurnResponse(_stream_chunks(turn), turn, media_type=STREAM_MEDIA_TYPE)


async def _stream_chunks(turn: Turn) -> AsyncIterator[str]:
    """Text chunks, then ``[[END]]`` (or ``[[ERROR]] ...`` if generation failed midway)."""
    async with aclosing(events(turn)) as items:
        async for item in items:
            if isinstance(item, ChatDelta):
                yield item.text
            elif isinstance(item, ChatDone):
                yield END_MARKER
            elif isinstance(item, StreamFailure):
                yield stream_error_line(item.error)
