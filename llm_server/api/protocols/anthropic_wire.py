"""Request side of Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``):
its request models, what is refused, and the translation into the serving layer's one
:class:`~llm_server.serving.request.TurnRequest` (:func:`messages_turn`).

Content blocks: ``text``; ``tool_use`` (an assistant's earlier call, rendered as the model writes
calls); ``tool_result`` (its result, a ``tool`` message). Tools (``{"name", "description",
"input_schema"}``) and ``tool_choice`` (``auto`` / ``any`` / ``tool`` / ``none``) are rewritten
into the Chat Completions shapes the serving layer reads; ``output_config.format`` (a JSON schema)
becomes ``response_format``; ``top_k`` is the request's own (0: off). Images, documents,
``thinking``, server tools and unknown keys are refused with a 400 naming them
(:func:`unsupported_fields`); ``metadata`` and ``service_tier`` are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.spec_chat_wire import Integer
from llm_server.serving.request import Message, Sampling, ToolRequest, TurnRequest
from llm_server.serving.tools import call_text

#: Accepted and ignored: they never change what is generated (caching and routing hints).
IGNORED_FIELDS = frozenset({"metadata", "service_tier", "cache_control", "inference_geo", "speed"})
MAX_STOP_SEQUENCES = 16


class MessageParam(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: StrictStr
    content: str | list[dict[str, Any]]


class CountTokensRequest(BaseModel):
    """The body of ``/v1/messages/count_tokens`` (unknown keys are refused)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    """The body of ``POST /v1/messages``."""

    max_tokens: Integer = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: Integer | None = Field(default=None, ge=0)
    stop_sequences: list[StrictStr] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stream: StrictBool = False
    output_config: dict[str, Any] | None = None


def unsupported_fields(body: CountTokensRequest) -> list[str]:
    """Parameters that would change the output but are not implemented (a 400 names the first)."""
    bad: list[str] = []
    if body.thinking is not None and body.thinking.get("type") != "disabled":
        bad.append("thinking")
    if isinstance(body, MessagesRequest):
        bad += [f"output_config.{k}" for k, v in (body.output_config or {}).items() if k != "format" and v is not None]
    for i, tool in enumerate(body.tools or []):
        if tool.get("type", "custom") != "custom":
            bad.append(f"tools.{i}.type")
    return bad + sorted(k for k in (body.model_extra or {}) if k not in IGNORED_FIELDS)


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


# --- tools -> Chat Completions shapes ---------------------------------------------------------
def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """``{"name", "description", "input_schema"}`` -> ``{"type": "function", "function": {...}}``."""
    if tools is None:
        return None
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise _bad("a tool needs a name and an input_schema object", f"tools.{i}")
        function = {"name": tool["name"], "description": tool.get("description") or "",
                    "parameters": tool["input_schema"]}
        out.append({"type": "function", "function": function})
    return out


def tool_request(body: CountTokensRequest) -> ToolRequest | None:
    """``tools`` / ``tool_choice`` as the serving layer's ToolRequest (None: no tools)."""
    if body.tools is None and body.tool_choice is None:
        return None
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    mapped: Any
    if kind in ("auto", "none"):
        mapped = kind
    elif kind == "any":
        mapped = "required"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        mapped = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice.type must be auto, any, tool (with a name) or none", "tool_choice.type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    return ToolRequest(chat_tools(body.tools), mapped, parallel)


# --- content blocks -> messages ---------------------------------------------------------------
def system_text(system: str | list[dict[str, Any]] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    return "\n".join(_text_block(block, f"system.{i}") for i, block in enumerate(system)) or None


def _text_block(block: dict[str, Any], where: str) -> str:
    if block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise APIError(400, f"{where}: content block type {block.get('type')!r} is not supported here (text)",
                       param=where, code="unsupported_content")
    return str(block["text"])


def chat_messages(body: CountTokensRequest) -> list[Message]:
    """``system`` and ``messages`` as chat messages (tool results become ``tool`` messages)."""
    system = system_text(body.system)
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(body.messages):
        if message.role not in ("user", "assistant"):
            raise _bad(f"messages.{i}.role must be user or assistant; got {message.role!r}", f"messages.{i}.role")
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
        else:
            messages.extend(_blocks(i, message.role, message.content))
    return messages


def _blocks(index: int, role: str, blocks: list[dict[str, Any]]) -> list[Message]:
    out: list[Message] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        where, kind = f"messages.{index}.content.{j}", block.get("type")
        if kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise _bad("a tool_use block needs a name and an input object", where)
            texts.append(call_text(block["name"], block["input"]))
        elif kind == "tool_result" and role == "user":
            out.append({"role": "tool", "content": _tool_result(block, where)})
        else:
            texts.append(_text_block(block, where))
    if texts:
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def _tool_result(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        content = "\n".join(_text_block(part, f"{where}.content.{k}") for k, part in enumerate(content))
    if not isinstance(content, str):
        raise _bad("tool_result content must be a string or a list of text blocks", f"{where}.content")
    return f"Error: {content}" if block.get("is_error") else content


# --- request -> TurnRequest -------------------------------------------------------------------
def messages_turn(body: MessagesRequest, request_id: str) -> TurnRequest:
    """The request in the serving layer's terms."""
    stops = tuple(s for s in body.stop_sequences or () if s)
    return TurnRequest(
        request_id=request_id,
        messages=tuple(chat_messages(body)),
        sampling=Sampling(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, stop=stops),
        tools=tool_request(body),
        response_format=response_format(body.output_config),
    )


def response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``output_config.format`` (``{"type": "json_schema", "schema"}``) as the ``response_format`` serving reads."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _bad("output_config.format must be {'type': 'json_schema', 'schema': {...}}", "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (JSON text) as a tool_use block's ``input`` object."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
