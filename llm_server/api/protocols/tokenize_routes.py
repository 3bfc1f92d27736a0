"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes (same key and errors as ``/v1``).

- ``/tokenize``: ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
  "add_generation_prompt": true}`` (the messages rendered through the chat template exactly as a
  chat completion would render them) -> ``{"count", "max_model_len", "tokens", "token_strs"}``;
  ``return_token_strs: true`` fills ``token_strs``.
- ``/detokenize``: ``{"tokens": [int, ...]}`` -> ``{"prompt": str}``.

The tokenizer work is the serving layer's (:meth:`ChatService.tokenize` / ``detokenize``).
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from llm_server.api.ops.readiness import ready_chat, ready_engine
from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.openai_wire import ChatMessage, chat_messages
from llm_server.api.protocols.turns import api_error_for
from llm_server.serving.request import ChatInputError

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["tokenizer"])


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str
    text: str | None = None


class _Message(BaseModel):
    """A chat message as on /v1/chat/completions, every key known (an unknown one is a 400)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: Any = None
    function_call: Any = None
    tool_call_id: str | None = None


#: Exactly one of ``prompt`` and ``messages`` (what the route checks), said in the OpenAPI document.
_ONE_INPUT: dict[str, Any] = {"oneOf": [
    {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}, "not": {"required": ["messages"]}},
    {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1}},
     "not": {"required": ["prompt"]}},
]}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_ONE_INPUT)

    model: str | None = None
    prompt: str | None = None
    messages: list[_Message] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1_000_000)


def _check_model(request: Request, model: str | None) -> Any:
    engine = ready_engine(request)
    if model is not None and model != str(engine.model_id):
        raise APIError(404, f"The model `{model}` does not exist. This server serves `{engine.model_id}`.",
                       param="model", code="model_not_found")
    return engine


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    engine = _check_model(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", param="prompt", code="invalid_value")
    if body.messages is not None and not body.add_generation_prompt:
        raise APIError(400, "add_generation_prompt false is not supported: messages are tokenized as a chat "
                       "turn", param="add_generation_prompt", code="unsupported_value")
    messages = None
    if body.messages is not None:
        wire = [ChatMessage.model_validate(m.model_dump(exclude_none=True)) for m in body.messages]
        messages = chat_messages(wire)
    chat = ready_chat(request)
    try:
        ids = await anyio.to_thread.run_sync(chat.tokenize, body.prompt, messages, body.add_special_tokens)
    except ChatInputError as exc:
        raise api_error_for(exc) from exc
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    _check_model(request, body.model)
    chat = ready_chat(request)
    try:
        text = await anyio.to_thread.run_sync(chat.detokenize, body.tokens)
    except ChatInputError as exc:
        raise api_error_for(exc) from exc
    return {"prompt": text}
