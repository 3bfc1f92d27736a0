"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

A thin adapter: the body is validated by its request model
(:mod:`llm_server.api.protocols.openai_wire`), refused with a 400 naming each field this server
does not honour, turned into one :class:`~llm_server.serving.request.TurnRequest` and opened
through the shared engine client (:mod:`llm_server.api.protocols.turns`) *before* any response
starts, so bad input, an unknown model, a too-long prompt or a full queue are proper
400/404/503 answers (503 with ``Retry-After`` while the model loads too). The answer is written
by :mod:`llm_server.api.protocols.openai_render`: whole, or as Server-Sent Events
(``data: {chunk}`` ... ``data: [DONE]``; an error after the stream started arrives as a final
``data: {"error": {...}}`` event). A client that disconnects cancels its generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from llm_server.api.ops.readiness import ready_engine
from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.plumbing.errors import APIError
from llm_server.api.plumbing.limits import CLIENT_CLOSED_REQUEST
from llm_server.api.plumbing.request_context import request_id
from llm_server.api.protocols.openai_choices import best_choices, choices_sse, collect_all, open_turns, whole_choices
from llm_server.api.protocols.openai_render import Reply, sse_events
from llm_server.api.protocols.openai_wire import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    chat_turn,
    completion_turn,
    unsupported_chat_fields,
    unsupported_completion_fields,
)
from llm_server.api.protocols.turns import TurnResponse, api_error_for, collect, open_turn
from llm_server.serving.request import TurnRequest

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])

_SERVER_STARTED = int(time.time())
_SSE_MEDIA_TYPE = "text/event-stream"
#: The serving layer's field names -> this API's.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


def unsupported_error(fields: list[str]) -> APIError:
    names = ", ".join(fields)
    return APIError(
        400, f"unsupported parameter(s): {names}; this server does not implement them",
        param=fields[0], code="unsupported_parameter",
    )


def _error_mapper(prompt_param: str) -> Callable[[Exception], APIError]:
    """Serving/engine errors in this API's terms (its field names, the prompt's field)."""
    return partial(api_error_for, context_param=prompt_param, param_names=_PARAM_NAMES)


def check_model(request: Request, model: str) -> str:
    served = str(ready_engine(request).model_id)
    if model != served:
        raise APIError(
            404, f"The model `{model}` does not exist. This server serves `{served}`.",
            type="invalid_request_error", param="model", code="model_not_found",
        )
    return served


async def _answer(request: Request, body: SamplingFields, turn_request: TurnRequest, chat: bool,
                  prompt_param: str) -> Response:
    """Open the turn (errors -> HTTP errors), then answer it whole or as SSE."""
    if (body.n or 1) > 1 or (getattr(body, "best_of", None) or 1) > 1:
        return await _answer_choices(request, body, turn_request, chat, prompt_param)
    model = check_model(request, body.model)
    to_api_error = _error_mapper(prompt_param)
    turn = await open_turn(request, turn_request, to_api_error)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    legacy = isinstance(body, ChatCompletionRequest) and body.functions is not None
    reply = replace(Reply.new(chat, model, turn, include_usage, legacy), echo=_echo(body, turn_request))
    if body.stream:
        return TurnResponse(sse_events(reply, to_api_error), turn, media_type=_SSE_MEDIA_TYPE)
    collected = await collect(request, turn, to_api_error)
    if collected is None:  # the client left; its generation was cancelled
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(reply.whole(collected))


def _echo(body: SamplingFields, turn_request: TurnRequest) -> str:
    return turn_request.prompt or "" if isinstance(body, CompletionRequest) and body.echo else ""


async def _answer_choices(request: Request, body: SamplingFields, turn_request: TurnRequest, chat: bool,
                          prompt_param: str) -> Response:
    """``n`` choices (or ``best_of`` candidates): one turn each (:mod:`.openai_choices`)."""
    n, best_of = body.n or 1, getattr(body, "best_of", None) or 1
    model = check_model(request, body.model)
    to_api_error = _error_mapper(prompt_param)
    wanted_logprobs = turn_request.logprobs
    if best_of > 1 and wanted_logprobs is None:  # candidates are ranked by their tokens' log-probabilities
        turn_request = replace(turn_request, logprobs=0)
    turns = await open_turns(request, turn_request, max(n, best_of), to_api_error)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    legacy = isinstance(body, ChatCompletionRequest) and body.functions is not None
    first = replace(Reply.new(chat, model, turns[0], include_usage, legacy), echo=_echo(body, turn_request))
    replies = [replace(first, turn=turn, index=index) for index, turn in enumerate(turns)]
    if body.stream:
        return TurnResponse(choices_sse(replies, to_api_error), turns, media_type=_SSE_MEDIA_TYPE)
    collected = await collect_all(request, turns, to_api_error)
    if collected is None:  # the client left; every choice's generation was cancelled
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if best_of > 1:
        return JSONResponse(best_choices(replies, collected, n, wanted_logprobs is not None))
    return JSONResponse(whole_choices(replies, collected))


# --- endpoints --------------------------------------------------------------------------------
@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    check_model(request, model)
    return _model_card(request)


def _model_card(request: Request) -> dict[str, Any]:
    engine = ready_engine(request)
    card: dict[str, Any] = {"id": str(engine.model_id), "object": "model", "created": _SERVER_STARTED,
                            "owned_by": "llm_server"}
    max_context = getattr(engine, "max_context", None)
    if isinstance(max_context, int):
        card["max_model_len"] = max_context
    runner = getattr(engine, "runner_name", None)
    if isinstance(runner, str) and runner:
        card["runner"] = runner  # GenericRunner / LlamaRunner batch; HFRunner runs one sequence at a time
    return card


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    bad = unsupported_chat_fields(body)
    if bad:
        raise unsupported_error(bad)
    turn_request = chat_turn(body, request_id(request))
    logger.info("chat completion: %d messages, stream=%s, improvement=%s, tools=%s", len(turn_request.messages),
                body.stream, body.improvement, body.tool_choice if body.tools else None)
    return await _answer(request, body, turn_request, True, "messages")


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    bad = unsupported_completion_fields(body)
    if bad:
        raise unsupported_error(bad)
    return await _answer(request, body, completion_turn(body, request_id(request)), False, "prompt")
