"""Response side of Anthropic's Messages API: a turn's typed events written as a ``message``.

Whole (:func:`whole_message`) or as Anthropic's named Server-Sent Events (:func:`message_events`):
``message_start``, ``ping``, per content block ``content_block_start``, ``content_block_delta``
(``text_delta`` / ``input_json_delta``), ``content_block_stop``, then ``message_delta`` (the
``stop_reason`` and output tokens) and ``message_stop``; after a failure, an ``error`` event.
Errors are ``{"type": "error", "error": {"type", "message"}}`` (:func:`error_body`). A turn with
tools held its text back: the text block arrives whole, then one ``tool_use`` block per call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.anthropic_wire import tool_input
from llm_server.api.protocols.turns import Collected, StreamFailure, Turn, events
from llm_server.serving.tools import ToolCall
from llm_server.serving.turn_stream import ChatDelta, ChatDone

#: HTTP status -> Anthropic's error type.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}


def error_body(error: APIError) -> dict[str, Any]:
    """An error in Anthropic's shape (the status decides the type; the message names the parameter,
    since this shape has no field for it)."""
    kind = _ERROR_TYPES.get(error.status_code, "invalid_request_error" if error.status_code < 500 else "api_error")
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def stop_reason(done: ChatDone) -> str:
    if done.tool_calls:
        return "tool_use"
    return "max_tokens" if done.finish_reason == "length" else "end_turn"


def tool_use_block(call: ToolCall, with_input: bool = True) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name,
            "input": tool_input(call.arguments) if with_input else {}}


def _usage(input_tokens: int, output_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _envelope(message_id: str, model: str) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None}


def whole_message(model: str, collected: Collected) -> dict[str, Any]:
    done = collected.done
    content: list[dict[str, Any]] = [{"type": "text", "text": collected.text}] if collected.text else []
    content += [tool_use_block(call) for call in done.tool_calls]
    return {**_envelope(f"msg_{uuid.uuid4().hex}", model), "content": content, "stop_reason": stop_reason(done),
            "usage": _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)}


def sse(kind: str, payload: dict[str, Any]) -> str:
    data = json.dumps({"type": kind, **payload}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


class _Blocks:
    """Content blocks as they are written: the open text block, and the next index."""

    def __init__(self) -> None:
        self.index = 0
        self.text_open = False

    def text(self, text: str) -> list[str]:
        lines = []
        if not self.text_open:
            self.text_open = True
            lines.append(sse("content_block_start", {"index": self.index,
                                                     "content_block": {"type": "text", "text": ""}}))
        delta = {"type": "text_delta", "text": text}
        return [*lines, sse("content_block_delta", {"index": self.index, "delta": delta})]

    def close_text(self) -> list[str]:
        if not self.text_open:
            return []
        self.text_open = False
        self.index += 1
        return [sse("content_block_stop", {"index": self.index - 1})]

    def tool_use(self, call: ToolCall) -> list[str]:
        index = self.index
        self.index += 1
        delta = {"type": "input_json_delta", "partial_json": json.dumps(tool_input(call.arguments))}
        return [sse("content_block_start", {"index": index, "content_block": tool_use_block(call, False)}),
                sse("content_block_delta", {"index": index, "delta": delta}),
                sse("content_block_stop", {"index": index})]


async def message_events(model: str, turn: Turn, to_api_error: Callable[[Exception], APIError]) -> AsyncIterator[str]:
    """The SSE body of a streamed message."""
    start = {**_envelope(f"msg_{uuid.uuid4().hex}", model), "usage": _usage(turn.stream.prompt_tokens, 0)}
    yield sse("message_start", {"message": start})
    yield sse("ping", {})
    blocks = _Blocks()
    async with aclosing(events(turn)) as items:
        async for item in items:
            if isinstance(item, ChatDelta) and item.text:
                for line in blocks.text(item.text):
                    yield line
            elif isinstance(item, StreamFailure):
                yield sse("error", {"error": error_body(to_api_error(item.error))["error"]})
            elif isinstance(item, ChatDone):
                for line in _finish(blocks, item):
                    yield line


def _finish(blocks: _Blocks, done: ChatDone) -> list[str]:
    lines = blocks.text(done.held_text) if done.held_text else []
    lines += blocks.close_text()
    for call in done.tool_calls:
        lines += blocks.tool_use(call)
    delta = {"delta": {"stop_reason": stop_reason(done), "stop_sequence": None},
             "usage": {"output_tokens": done.completion_tokens}}
    return [*lines, sse("message_delta", delta), sse("message_stop", {})]
