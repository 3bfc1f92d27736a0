"""Response side of OpenAI's Responses API: a turn's typed events written as a ``response`` object.

:class:`ResponseDraft` holds what a response echoes (model, instructions, tools, ``text``...) and
writes the object whole (:meth:`ResponseDraft.finished`) or as Server-Sent Events
(:func:`response_events`) with a ``sequence_number`` on each: ``response.created``,
``response.in_progress``, per output item ``response.output_item.added`` ... ``done`` (a message:
``content_part.added``, ``output_text.delta`` ..., ``output_text.done``, ``content_part.done``;
a function call: ``function_call_arguments.delta`` / ``.done``), then ``response.completed``
(``response.incomplete`` when ``max_output_tokens`` cut it short) or, after a failure,
``response.failed``. A turn with tools held its text back: it arrives whole, then the calls.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.turns import Collected, StreamFailure, Turn, events
from llm_server.serving.tools import ToolCall
from llm_server.serving.turn_stream import ChatDelta, ChatDone


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(done: ChatDone) -> dict[str, Any]:
    return {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
            "name": call.name, "arguments": arguments, "status": status}


def output_items(text: str, done: ChatDone, message_id: str) -> list[dict[str, Any]]:
    """The output of a finished turn: its message (unless it was only calls), then its calls."""
    status = "incomplete" if done.finish_reason == "length" else "completed"
    items: list[dict[str, Any]] = []
    if text or not done.tool_calls:
        items.append(message_item(message_id, text, status))
    items.extend(call_item(call, call.arguments, "completed") for call in done.tool_calls)
    return items


@dataclass
class ResponseDraft:
    """One response being written: what it echoes of the request, and its id."""

    model: str
    echo: dict[str, Any]
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, status: str, output: list[dict[str, Any]], done: ChatDone | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "error": None, "incomplete_details": incomplete,
            "usage": usage(done) if done is not None else None, **self.echo,
        }

    def finished(self, collected: Collected, message_id: str | None = None) -> dict[str, Any]:
        """The whole response of a finished turn (held text and calls included)."""
        done = collected.done
        output = output_items(collected.text, done, message_id or new_id("msg"))
        status = "incomplete" if done.finish_reason == "length" else "completed"
        return self.envelope(status, output, done)

    def failed(self, error: APIError) -> dict[str, Any]:
        body = self.envelope("failed", [])
        body["error"] = {"code": error.code or error.type, "message": error.message}
        return body


class _Sequencer:
    """SSE events with their ``sequence_number``."""

    def __init__(self) -> None:
        self.number = 0

    def event(self, kind: str, **payload: Any) -> str:
        body = {"type": kind, "sequence_number": self.number, **payload}
        self.number += 1
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n"


class _MessageWriter:
    """The events of the one output message: opened at its first text, closed at the end."""

    def __init__(self, seq: _Sequencer) -> None:
        self.seq = seq
        self.id = new_id("msg")
        self.text = ""
        self.opened = False

    def open(self) -> list[str]:
        if self.opened:
            return []
        self.opened = True
        where = {"item_id": self.id, "output_index": 0, "content_index": 0}
        return [self.seq.event("response.output_item.added", output_index=0,
                               item=message_item(self.id, None, "in_progress")),
                self.seq.event("response.content_part.added", **where, part=output_text(""))]

    def delta(self, text: str) -> list[str]:
        self.text += text
        return [*self.open(), self.seq.event("response.output_text.delta", item_id=self.id, output_index=0,
                                             content_index=0, delta=text, logprobs=[])]

    def close(self, status: str) -> list[str]:
        where = {"item_id": self.id, "output_index": 0, "content_index": 0}
        return [*self.open(),
                self.seq.event("response.output_text.done", **where, text=self.text, logprobs=[]),
                self.seq.event("response.content_part.done", **where, part=output_text(self.text)),
                self.seq.event("response.output_item.done", output_index=0,
                               item=message_item(self.id, self.text, status))]


def _call_events(seq: _Sequencer, call: ToolCall, index: int) -> list[str]:
    item = call_item(call, "", "in_progress")
    where = {"item_id": item["id"], "output_index": index}
    return [seq.event("response.output_item.added", output_index=index, item=item),
            seq.event("response.function_call_arguments.delta", **where, delta=call.arguments),
            seq.event("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments),
            seq.event("response.output_item.done", output_index=index,
                      item=call_item(call, call.arguments, "completed"))]


async def response_events(draft: ResponseDraft, turn: Turn, to_api_error: Callable[[Exception], APIError],
                          on_done: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
    """The SSE body of a streamed response; ``on_done`` gets the final response object (to store it)."""
    seq = _Sequencer()
    yield seq.event("response.created", response=draft.envelope("in_progress", []))
    yield seq.event("response.in_progress", response=draft.envelope("in_progress", []))
    message = _MessageWriter(seq)
    async with aclosing(events(turn)) as items:
        async for item in items:
            if isinstance(item, ChatDelta) and item.text:
                for line in message.delta(item.text):
                    yield line
            elif isinstance(item, StreamFailure):
                yield seq.event("response.failed", response=draft.failed(to_api_error(item.error)))
            elif isinstance(item, ChatDone):
                for line in _finish(seq, draft, message, item, on_done):
                    yield line


def _finish(seq: _Sequencer, draft: ResponseDraft, message: _MessageWriter, done: ChatDone,
            on_done: Callable[[dict[str, Any]], None]) -> list[str]:
    status = "incomplete" if done.finish_reason == "length" else "completed"
    lines: list[str] = []
    if done.held_text:
        lines += message.delta(done.held_text)
    if message.opened or not done.tool_calls:
        lines += message.close(status)
    first = 1 if message.opened else 0
    for index, call in enumerate(done.tool_calls):
        lines += _call_events(seq, call, first + index)
    final = draft.finished(Collected(message.text, done), message.id)
    on_done(final)
    kind = "response.incomplete" if status == "incomplete" else "response.completed"
    return [*lines, seq.event(kind, response=final)]
