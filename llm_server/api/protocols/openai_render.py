"""Response side of the OpenAI-compatible API: a turn's typed events written as OpenAI objects.

:class:`Reply` writes one answer as a chat completion or a text completion, whole
(:meth:`Reply.whole`) or as Server-Sent Events (:func:`sse_events`): a role chunk, one chunk per
delta, the finish chunk, usage, ``[DONE]``; or, after a failure, a final error event. A turn that
could call tools held its text back; its :class:`~llm_server.serving.turn_stream.ChatDone` carries
the text and the calls, written here as ``message.tool_calls`` or ``delta.tool_calls`` chunks.
Log-probabilities arrive as :class:`~llm_server.serving.structured.TokenText` and are written in
the chat or the legacy completion shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.turns import Collected, StreamFailure, Turn, events
from llm_server.serving.structured import TokenText
from llm_server.serving.tools import ToolCall
from llm_server.serving.turn_stream import ChatDelta, ChatDone


def finish_reason(done: ChatDone) -> str:
    if done.tool_calls:
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def usage(first: ChatDone, *more: ChatDone) -> dict[str, Any]:
    """OpenAI's usage of one choice, or of several (``n``): the prompt counted once, every choice's
    completion tokens summed."""
    completion = sum(done.completion_tokens for done in (first, *more))
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": sum(done.accepted_prediction_tokens for done in (first, *more)),
            "rejected_prediction_tokens": sum(done.rejected_prediction_tokens for done in (first, *more)),
        },
    }


def tool_calls_json(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def chat_logprobs(items: list[TokenText]) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs}, ...]}`` (chat completions)."""
    def entry(item: TokenText) -> dict[str, Any]:
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in item.top]
        return {"token": item.token, "logprob": item.logprob, "bytes": list(item.token.encode()),
                "top_logprobs": top}

    return {"content": [entry(item) for item in items], "refusal": None}


def completion_logprobs(items: list[TokenText], offset: int = 0) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (legacy completions)."""
    offsets: list[int] = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [dict(item.top) for item in items],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Reply:
    """How one answer is written: a chat completion or a text completion, whole or in chunks."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    model: str
    turn: Turn
    include_usage: bool = False
    id: str = ""
    created: int = 0
    #: The request used the legacy ``functions``: a call is written as ``function_call``.
    legacy_functions: bool = False
    #: ``echo`` on /v1/completions: the prompt, written before the completion.
    echo: str = ""
    #: The choice this reply writes (``n`` > 1: one Reply per choice).
    index: int = 0

    @classmethod
    def new(cls, chat: bool, model: str, turn: Turn, include_usage: bool, legacy_functions: bool = False) -> Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, turn, include_usage, f"{prefix}-{uuid.uuid4().hex}", int(time.time()),
                   legacy_functions)

    def finish_reason(self, done: ChatDone) -> str:
        reason = finish_reason(done)
        return "function_call" if reason == "tool_calls" and self.legacy_functions else reason

    def _logprobs(self, with_prompt: bool = False) -> dict[str, Any] | None:
        """The log-probabilities recorded since the last call (None when not requested); ``with_prompt``:
        an echoed prompt's first (when the request asked for them)."""
        items = self.turn.stream.take_logprobs()
        if items is None:
            return None
        if self.chat:
            return chat_logprobs(items)
        prompt = self.turn.stream.prompt_logprobs() if with_prompt and self.echo else None
        return completion_logprobs([*(prompt or []), *items])

    def _prompt_logprobs(self) -> dict[str, Any] | None:
        prompt = self.turn.stream.prompt_logprobs()
        return None if prompt is None else completion_logprobs(prompt)

    def _envelope(self, streamed: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        kind += ".chunk" if streamed and self.chat else ""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, collected: Collected) -> dict[str, Any]:
        done = collected.done
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": collected.text}
            if done.tool_calls and self.legacy_functions:
                first = done.tool_calls[0]
                message.update(content=done.held_text or None,
                               function_call={"name": first.name, "arguments": first.arguments})
            elif done.tool_calls:
                message.update(content=done.held_text or None, tool_calls=tool_calls_json(done.tool_calls))
            choice: dict[str, Any] = {"index": self.index, "message": message}
        else:
            choice = {"index": self.index, "text": self.echo + collected.text}
        choice.update(logprobs=self._logprobs(with_prompt=True), finish_reason=self.finish_reason(done))
        return {**self._envelope(False), "choices": [choice], "usage": usage(done), "system_fingerprint": None}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": self.index, "delta": delta}
        else:
            choice = {"index": self.index, "text": delta.get("content", "")}
        choice.update(logprobs=self._logprobs() if delta.get("content") else None, finish_reason=finish)
        out = {**self._envelope(True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def held_chunks(self, done: ChatDone) -> list[dict[str, Any]]:
        """The chunks of a reply held back for tool calls: its content, then one chunk per call."""
        deltas: list[dict[str, Any]] = [{"content": done.held_text}] if done.held_text else []
        for index, call in enumerate(done.tool_calls):
            if self.legacy_functions:
                deltas.append({"function_call": {"name": call.name, "arguments": call.arguments}})
                break
            deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": call.arguments}}]})
        return [self.chunk(delta) for delta in deltas]

    def usage_chunk(self, *dones: ChatDone) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": usage(*dones)}

    def echo_chunk(self) -> dict[str, Any]:
        """The echoed prompt of a streamed completion, with its log-probabilities when asked (sent with the
        choice's first event: they are known by then)."""
        return {**self.chunk({}), "choices": [{"index": self.index, "text": self.echo,
                                               "logprobs": self._prompt_logprobs(), "finish_reason": None}]}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def sse_events(reply: Reply, to_api_error: Callable[[Exception], APIError]) -> AsyncIterator[str]:
    """SSE body: (chat) a role chunk, one chunk per delta, the finish chunk, usage, [DONE];
    or, after a failure, a final error event instead of the finish."""
    if reply.chat:
        yield sse(reply.chunk({"role": "assistant", "content": ""}))
    echo = reply.echo  # the echoed prompt goes with the first event (its log-probabilities are known then)
    async with aclosing(events(reply.turn)) as items:
        async for item in items:
            if echo:
                echo = ""
                yield sse(reply.echo_chunk())
            if isinstance(item, ChatDelta):
                yield sse(reply.chunk({"content": item.text}))
            elif isinstance(item, StreamFailure):
                yield sse(to_api_error(item.error).body())
            elif isinstance(item, ChatDone):
                for chunk in reply.held_chunks(item):
                    yield sse(chunk)
                yield sse(reply.chunk({}, reply.finish_reason(item)))
                if reply.include_usage:
                    yield sse(reply.usage_chunk(item))
                yield sse("[DONE]")
