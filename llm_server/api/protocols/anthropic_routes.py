"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A thin adapter: the body is validated by :mod:`llm_server.api.protocols.anthropic_wire`, what
cannot be honoured is a 400 naming the parameter, the request becomes one TurnRequest opened by
the shared engine client (:mod:`llm_server.api.protocols.turns`), and
:mod:`llm_server.api.protocols.anthropic_render` writes the message, whole or as named SSE events.

Every error of these routes, the key check's and body validation's included, is in Anthropic's
shape (``{"type": "error", "error": {"type", "message"}}``): the routes use
:class:`AnthropicRoute`, which catches them around the route's own handler. The key is accepted
as ``x-api-key`` (what the ``anthropic`` SDK sends) or ``Authorization: Bearer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_server.api.ops.readiness import ready_chat
from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.plumbing.errors import APIError, validation_error
from llm_server.api.plumbing.limits import CLIENT_CLOSED_REQUEST
from llm_server.api.plumbing.request_context import request_id
from llm_server.api.protocols.anthropic_render import error_body, message_events, whole_message
from llm_server.api.protocols.anthropic_wire import (
    CountTokensRequest,
    MessagesRequest,
    chat_messages,
    messages_turn,
    tool_request,
    unsupported_fields,
)
from llm_server.api.protocols.openai_routes import check_model
from llm_server.api.protocols.turns import EXPECTED_ERRORS, TurnResponse, api_error_for, collect, open_turn
from llm_server.serving.tools import parse_tools, with_tools_prompt

logger = logging.getLogger(__name__)

_serving_error = partial(api_error_for, context_param="messages", param_names={"max_new_tokens": "max_tokens"})


def _to_api_error(exc: Exception) -> APIError:
    """Serving/engine errors in this API's terms (``max_tokens``, not the serving layer's name)."""
    error = _serving_error(exc)
    error.message = error.message.replace("max_new_tokens", "max_tokens")
    return error


def anthropic_error(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status_code, headers=error.headers)


class AnthropicRoute(APIRoute):
    """A route whose errors (key check, validation, APIError, HTTP errors) are written in Anthropic's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return anthropic_error(validation_error(request, exc))
            except APIError as exc:
                return anthropic_error(exc)
            except StarletteHTTPException as exc:  # e.g. a body FastAPI could not read
                return anthropic_error(APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

        return route


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["anthropic"],
                   route_class=AnthropicRoute)


def _refuse_unsupported(body: CountTokensRequest) -> None:
    bad = unsupported_fields(body)
    if bad:
        raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}; this server does not implement them",
                       param=bad[0], code="unsupported_parameter")


@router.post("/messages", response_model=None)
async def create_message(body: MessagesRequest, request: Request) -> Response:
    _refuse_unsupported(body)
    model = check_model(request, body.model)
    turn_request = messages_turn(body, request_id(request))
    logger.info("messages: %d messages, stream=%s, tools=%d", len(turn_request.messages), body.stream,
                len(body.tools or []))
    turn = await open_turn(request, turn_request, _to_api_error)
    if body.stream:
        return TurnResponse(message_events(model, turn, _to_api_error), turn, media_type="text/event-stream")
    collected = await collect(request, turn, _to_api_error)
    if collected is None:  # the client left; its generation was cancelled
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(whole_message(model, collected))


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    """The prompt tokens the same request would use (chat template and tools prompt included)."""
    _refuse_unsupported(body)
    check_model(request, body.model)
    chat = ready_chat(request)
    messages = chat_messages(body)
    tools = tool_request(body)

    def count() -> int:
        toolset = parse_tools(tools.tools, tools.choice, tools.parallel) if tools is not None else None
        return len(chat.prompt_ids(with_tools_prompt(messages, toolset) if toolset is not None else messages))

    try:
        return {"input_tokens": await anyio.to_thread.run_sync(count)}
    except EXPECTED_ERRORS as exc:
        raise _to_api_error(exc) from exc
