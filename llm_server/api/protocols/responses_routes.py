"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A thin adapter like :mod:`llm_server.api.protocols.openai_routes`: the body is validated by
:class:`~llm_server.api.protocols.responses_wire.ResponsesRequest`, what cannot be honoured is a
400 naming the parameter, ``previous_response_id`` is looked up in the caller's stored
responses (:mod:`llm_server.api.protocols.responses_store`, 404 when unknown, evicted or another
key's), the request becomes one TurnRequest opened by the shared engine client
(:mod:`llm_server.api.protocols.turns`), and :mod:`llm_server.api.protocols.responses_render`
writes the answer, whole or as SSE. With ``store`` (the default) the finished response and its
conversation are kept. Errors are OpenAI-shaped.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from llm_server.api.plumbing.auth import presented_key, require_api_key
from llm_server.api.plumbing.errors import APIError
from llm_server.api.plumbing.limits import CLIENT_CLOSED_REQUEST
from llm_server.api.plumbing.request_context import request_id
from llm_server.api.protocols.openai_routes import check_model, unsupported_error
from llm_server.api.protocols.responses_render import ResponseDraft, response_events
from llm_server.api.protocols.responses_store import ResponseStore, owner_of
from llm_server.api.protocols.responses_wire import (
    ResponsesRequest,
    chat_tool_choice,
    input_messages,
    responses_turn,
    text_config,
    unsupported_fields,
)
from llm_server.api.protocols.turns import TurnResponse, api_error_for, collect, open_turn
from llm_server.serving.request import Message
from llm_server.serving.tools import call_text

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["responses"])

_to_api_error = partial(api_error_for, context_param="input", param_names={"max_new_tokens": "max_output_tokens"})


def response_store(request: Request) -> ResponseStore:
    """The app's store of responses (made on first use; a test may set a smaller one)."""
    store: ResponseStore | None = getattr(request.app.state, "response_store", None)
    if store is None:
        store = request.app.state.response_store = ResponseStore()
    return store


def _owner(request: Request) -> str:
    """The scope of the caller's responses: the key it was admitted with (one shared scope with open access)."""
    keys = getattr(request.app.state, "keys", None)
    if keys is None or keys.open_access:
        return owner_of(None)
    settings = getattr(request.app.state, "settings", None)
    return owner_of(presented_key(request, allow_query=bool(getattr(settings, "allow_query_api_key", False))))


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found")


def _echo(body: ResponsesRequest) -> dict[str, Any]:
    """What a response repeats of its request."""
    tools = [{"strict": True, "description": None, **t} for t in body.tools or []]
    choice = chat_tool_choice(body.tool_choice)
    return {
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "store": body.store,
        "temperature": body.temperature, "top_p": body.top_p, "text": text_config(body.text),
        "tool_choice": body.tool_choice if isinstance(choice, dict) else (choice or "auto"), "tools": tools,
        "truncation": "disabled", "user": body.user, "reasoning": None, "background": False,
    }


def _conversation(request: Request, body: ResponsesRequest, owner: str) -> list[Message]:
    """The stored conversation of ``previous_response_id``, then this request's input."""
    history: list[Message] = []
    if body.previous_response_id is not None:
        previous = response_store(request).get(owner, body.previous_response_id)
        if previous is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = [dict(m) for m in previous.conversation]
    return [*history, *input_messages(body.input)]


def _reply_message(response: dict[str, Any]) -> Message:
    """A response's output as one assistant message (its text, then its calls as the model writes them)."""
    parts: list[str] = []
    for item in response["output"]:
        if item["type"] == "message":
            parts.extend(c["text"] for c in item["content"] if c.get("text"))
        elif item["type"] == "function_call":
            parts.append(call_text(item["name"], item["arguments"]))
    return {"role": "assistant", "content": "\n".join(parts)}


@router.post("/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    bad = unsupported_fields(body)
    if bad:
        raise unsupported_error(bad)
    model = check_model(request, body.model)
    owner = _owner(request)
    conversation = _conversation(request, body, owner)
    turn_request = responses_turn(body, conversation, request_id(request))
    logger.info("response: %d messages, stream=%s, tools=%s, previous=%s", len(turn_request.messages),
                body.stream, len(body.tools or []), body.previous_response_id is not None)
    draft = ResponseDraft(model, _echo(body))  # before the turn opens: nothing below may refuse it
    turn = await open_turn(request, turn_request, _to_api_error)

    def keep(final: dict[str, Any]) -> None:
        if body.store and not response_store(request).put(owner, final, [*conversation, _reply_message(final)]):
            logger.warning("response %s not stored: larger than the store's byte bound", final["id"])

    if body.stream:
        return TurnResponse(response_events(draft, turn, _to_api_error, keep), turn, media_type="text/event-stream")
    collected = await collect(request, turn, _to_api_error)
    if collected is None:  # the client left; its generation was cancelled
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    final = draft.finished(collected)
    keep(final)
    return JSONResponse(final)


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> dict[str, Any]:
    stored = response_store(request).get(_owner(request), response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    if not response_store(request).delete(_owner(request), response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
