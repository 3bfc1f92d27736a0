"""OpenAI wire format of tool calling: ``tool`` / assistant ``tool_calls`` history messages in,
``message.tool_calls`` (whole) or ``delta.tool_calls`` chunks (streamed) out.

The routes own requests and responses; this module only translates. Reading calls out of the
model's text and building the prompt/grammar are :mod:`llm_server.serving.tools`. A streamed
reply that may hold calls is held back until it ends (a call is only known once it parses),
then sent as content or as one ``tool_calls`` chunk per call.
"""

from __future__ import annotations

from typing import Any

from llm_server.api.plumbing.errors import APIError
from llm_server.serving.tools import ToolCall, ToolSet, call_text, parse_calls

#: Roles a chat message may have once tools are supported.
TOOL_ROLE = "tool"


def assistant_calls_text(index: int, extra: dict[str, Any]) -> str:
    """An assistant message's ``tool_calls`` rendered as the model writes calls."""
    calls = extra.get("tool_calls")
    if extra.get("function_call"):
        calls = [{"type": "function", "function": extra["function_call"]}]
    if not isinstance(calls, list):
        raise APIError(400, "tool_calls must be a list", param=f"messages.{index}.tool_calls", code="invalid_value")
    texts: list[str] = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, "each tool call needs function.name", param=f"messages.{index}.tool_calls.{j}",
                           code="invalid_value")
        texts.append(call_text(function["name"], function.get("arguments", "{}")))
    return "\n".join(texts)


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def whole_message(text: str, tools: ToolSet | None) -> tuple[dict[str, Any], bool]:
    """(the assistant message, whether it holds calls) for a non-streamed reply."""
    if tools is None:
        return {"role": "assistant", "content": text}, False
    content, calls = parse_calls(text, tools)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content, "tool_calls": tool_calls_json(calls)}, True


def streamed_deltas(text: str, tools: ToolSet) -> tuple[list[dict[str, Any]], bool]:
    """(the deltas to send, whether they are calls) for a held-back streamed reply."""
    content, calls = parse_calls(text, tools)
    if not calls:
        return ([{"content": text}] if text else []), False
    deltas: list[dict[str, Any]] = [{"content": content}] if content else []
    for index, call in enumerate(calls):
        deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": call.arguments}}]})
    return deltas, True
