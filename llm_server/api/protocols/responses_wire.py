"""Request side of OpenAI's Responses API (``POST /v1/responses``): its request model, the checks
that refuse what this server cannot honour, and the translation into the serving layer's one
:class:`~llm_server.serving.request.TurnRequest` (:func:`responses_turn`).

``input`` is a string or a list of items: messages (``input_text`` / ``output_text`` parts),
``function_call`` items (an earlier call of the model) and ``function_call_output`` items (their
results). Tools (``{"type": "function", "name", "parameters"}``), ``tool_choice`` and
``text.format`` are rewritten into the Chat Completions shapes the serving layer reads. Built-in
tools (``web_search``, ``file_search``...), ``reasoning``, ``background`` and unknown keys are
refused with a 400 naming the parameter (:func:`unsupported_fields`); fields that never change the
output (``metadata``, ``user``, ``store``...) are accepted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.spec_chat_wire import Integer
from llm_server.serving import sampling
from llm_server.serving.request import Message, Sampling, ToolRequest, TurnRequest
from llm_server.serving.tools import call_text

#: Undeclared fields that are accepted and ignored: they never change what is generated.
IGNORED_FIELDS = frozenset({"service_tier", "prompt_cache_key", "safety_identifier", "include",
                            "prompt_cache_retention"})
#: Input message roles; "developer" is the newer name of "system".
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text")
MAX_METADATA_PAIRS = 16


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses`` (unknown keys land in ``model_extra`` and are refused)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Integer | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=sampling.MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: StrictBool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_PAIRS)
    store: StrictBool = True
    previous_response_id: str | None = None
    user: str | None = None
    truncation: str | None = None
    reasoning: Any = None
    background: StrictBool | None = None
    top_logprobs: Integer | None = None
    max_tool_calls: Integer | None = None
    conversation: Any = None
    prompt: Any = None


def unsupported_fields(body: ResponsesRequest) -> list[str]:
    """Parameters that would change the output but are not implemented (a 400 names the first)."""
    bad: list[str] = []
    if body.reasoning not in (None, {}) and not (isinstance(body.reasoning, dict) and
                                                 all(v is None for v in body.reasoning.values())):
        bad.append("reasoning")
    if body.background:
        bad.append("background")
    if body.truncation not in (None, "disabled"):
        bad.append("truncation")
    for name in ("top_logprobs", "max_tool_calls", "conversation", "prompt"):
        if getattr(body, name) not in (None, 0):
            bad.append(name)
    for i, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            bad.append(f"tools.{i}.type")
    return bad + sorted(k for k in (body.model_extra or {}) if k not in IGNORED_FIELDS)


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# --- tools, tool_choice, text.format -> Chat Completions shapes -------------------------------
def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """``{"type": "function", "name", "description", "parameters"}`` -> ``{"type": "function", "function": {...}}``."""
    if tools is None:
        return None
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str):
            raise _bad("a function tool needs a name", f"tools.{i}.name", "missing_field")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    """``"auto"|"none"|"required"`` or ``{"type": "function", "name"}`` in the Chat Completions shape."""
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise _bad("tool_choice must be none, auto, required or {'type': 'function', 'name': ...}", "tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") in ("auto", "none", "required"):
        return choice["type"]
    raise _bad(f"tool_choice of type {choice.get('type')!r} is not supported (function tools only)",
               "tool_choice", "unsupported_value")


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` (text / json_object / json_schema) -> the ``response_format`` serving reads."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema must be a JSON schema object", "text.format.schema", "missing_field")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        spec.setdefault("name", "response")
        return {"type": "json_schema", "json_schema": spec}
    raise _bad(f"text.format.type must be text, json_object or json_schema; got {kind!r}", "text.format.type")


def text_config(text: dict[str, Any] | None) -> dict[str, Any]:
    """The ``text`` object echoed in a response (``{"format": {"type": "text"}}`` by default)."""
    fmt = (text or {}).get("format") or {"type": "text"}
    return {"format": fmt}


# --- input items -> messages ------------------------------------------------------------------
def input_messages(value: str | list[dict[str, Any]]) -> list[Message]:
    """``input`` as chat messages: function calls rendered as the model writes them, their outputs
    as ``tool`` messages."""
    if isinstance(value, str):
        if not value:
            raise _bad("input must not be empty", "input")
        return [{"role": "user", "content": value}]
    if not value:
        raise _bad("input must not be an empty list", "input")
    messages: list[Message] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(i, item))
        elif kind == "function_call":
            _add_call(messages, i, item)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise _bad("function_call_output.output must be a string", f"input.{i}.output")
            messages.append({"role": "tool", "content": output})
        else:
            raise _bad(f"input item type {kind!r} is not supported (message, function_call, "
                       "function_call_output)", f"input.{i}.type", "unsupported_item_type")
    return messages


def _message(index: int, item: dict[str, Any]) -> Message:
    role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise _bad(f"message role {item.get('role')!r} is not supported (user, system, developer, assistant)",
                   f"input.{index}.role", "unsupported_role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad("message content must be a string or a list of text parts", f"input.{index}.content")
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _bad(f"content part type {kind!r} is not supported (input_text, output_text)",
                       f"input.{index}.content.{j}", "unsupported_content")
        texts.append(part["text"])
    return {"role": role, "content": "\n".join(texts)}


def _add_call(messages: list[Message], index: int, item: dict[str, Any]) -> None:
    name, arguments = item.get("name"), item.get("arguments", "{}")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise _bad("a function_call item needs name and arguments (strings)", f"input.{index}")
    text = call_text(name, arguments)
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and last["content"].rstrip().endswith("</tool_call>"):
        last["content"] = f"{last['content']}\n{text}"  # parallel calls: one assistant message
    else:
        messages.append({"role": "assistant", "content": text})


# --- request -> TurnRequest -------------------------------------------------------------------
def responses_turn(body: ResponsesRequest, conversation: list[Message], request_id: str) -> TurnRequest:
    """The request in the serving layer's terms. ``conversation``: the stored conversation of
    ``previous_response_id`` then :func:`input_messages`; ``instructions`` go first (they are not
    carried over from an earlier response, as on OpenAI)."""
    messages = list(conversation)
    if body.instructions:
        messages = [{"role": "system", "content": body.instructions}, *messages]
    tools = None
    if body.tools is not None or body.tool_choice is not None:
        tools = ToolRequest(chat_tools(body.tools), chat_tool_choice(body.tool_choice), body.parallel_tool_calls)
    return TurnRequest(
        request_id=request_id,
        messages=tuple(messages),
        sampling=Sampling(max_new_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p),
        response_format=response_format(body.text),
        tools=tools,
    )
