"""Several choices for one OpenAI request: ``n`` (chat and completions) and ``best_of`` (completions).

Each choice is a turn of its own in the engine, opened one after the other, so each counts
against admission (``n`` x the prompt) and a refusal of any stops those already opened. They
share one prefill: the first choice's prompt goes into the engine's prefix cache, and the
scheduler holds the others back while it is still being prefilled, so they start from its KV
(``usage.prompt_tokens_details.cached_tokens`` stays the first choice's; the engine's prefix-cache
counters show the others' hits). A seeded request gives choice ``i`` the seed ``seed + i``.

- ``n`` answered whole: one object with ``choices[0..n-1]``; streamed: the choices' chunks
  interleaved as they come, each with its ``index``, a finish chunk per choice, then (with
  ``stream_options.include_usage``) one usage chunk counting every choice, then ``[DONE]``.
- ``best_of`` (``/v1/completions``, not streamed): ``best_of`` candidates, the ``n`` with the highest
  cumulative log-probability of their tokens returned; usage counts every candidate, as OpenAI's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import Request

from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.openai_render import Reply, sse, usage
from llm_server.api.protocols.turns import Collected, StreamFailure, StreamItem, Turn, collect, events, open_turn
from llm_server.serving.request import TurnRequest
from llm_server.serving.turn_stream import Cancel, ChatDelta, ChatDone

ErrorMapper = Callable[[Exception], APIError]


def nth_turn(turn_request: TurnRequest, index: int) -> TurnRequest:
    """Choice ``index``: its own engine request id, and seed + index when seeded."""
    sampling = turn_request.sampling
    if sampling.seed is not None:
        sampling = replace(sampling, seed=(sampling.seed + index) % 2**63)
    return replace(turn_request, request_id=f"{turn_request.request_id}-{index}", sampling=sampling)


async def open_turns(request: Request, turn_request: TurnRequest, count: int, to_api_error: ErrorMapper) -> list[Turn]:
    """``count`` turns of one request, opened in order; a refusal stops those already open."""
    turns: list[Turn] = []
    try:
        for index in range(count):
            last = index == count - 1  # it ends the request's arrival announcement
            turns.append(await open_turn(request, nth_turn(turn_request, index), to_api_error, last=last))
    except BaseException:
        stop_all(turns)
        raise
    return turns


def stop_all(turns: list[Turn]) -> None:
    for turn in turns:
        turn.stop(Cancel.READER_LEFT)


async def collect_all(request: Request, turns: list[Turn], to_api_error: ErrorMapper) -> list[Collected] | None:
    """Every turn run to its end; None when the client left (all of them are then cancelled)."""
    try:
        collected = await asyncio.gather(*(collect(request, turn, to_api_error) for turn in turns))
    except BaseException:
        stop_all(turns)
        raise
    if any(c is None for c in collected):
        stop_all(turns)
        return None
    return [c for c in collected if c is not None]


def whole_choices(replies: list[Reply], collected: list[Collected]) -> dict[str, Any]:
    """One response object holding every choice; usage counts each choice's completion tokens."""
    answers = [reply.whole(c) for reply, c in zip(replies, collected, strict=True)]
    whole = {**answers[0], "choices": [a["choices"][0] for a in answers]}
    whole["usage"] = usage(*(c.done for c in collected))
    return whole


def best_choices(replies: list[Reply], collected: list[Collected], n: int, keep_logprobs: bool) -> dict[str, Any]:
    """The ``n`` candidates with the highest cumulative log-probability, re-indexed 0..n-1, best first."""
    whole = whole_choices(replies, collected)
    ranked = sorted(whole["choices"], key=_cumulative_logprob, reverse=True)[:n]
    for index, choice in enumerate(ranked):
        choice["index"] = index
        if not keep_logprobs:
            choice["logprobs"] = None
    return {**whole, "choices": ranked}


def _cumulative_logprob(choice: dict[str, Any]) -> float:
    """The sum of a completion choice's token log-probabilities (an echoed prompt's are the same for
    every candidate, so they do not change the order)."""
    return float(sum(lp for lp in choice["logprobs"]["token_logprobs"] if lp is not None))


async def choices_sse(replies: list[Reply], to_api_error: ErrorMapper) -> AsyncIterator[str]:
    """The SSE body of ``n`` streamed choices: their chunks as they come, each with its index; a
    finish chunk per choice; one usage chunk for all (when asked); ``[DONE]``. A failure of any
    choice ends the body with its error event (the others are cancelled)."""
    queue: asyncio.Queue[tuple[int, StreamItem]] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(index, reply.turn, queue)) for index, reply in enumerate(replies)]
    try:
        for reply in replies:
            if reply.chat:
                yield sse(reply.chunk({"role": "assistant", "content": ""}))
        echoing = {i for i, reply in enumerate(replies) if reply.echo}  # each with its choice's first event
        dones: dict[int, ChatDone] = {}
        while len(dones) < len(replies):
            index, item = await queue.get()
            reply = replies[index]
            if index in echoing:
                echoing.discard(index)
                yield sse(reply.echo_chunk())
            if isinstance(item, StreamFailure):
                yield sse(to_api_error(item.error).body())
                return
            if isinstance(item, ChatDelta):
                yield sse(reply.chunk({"content": item.text}))
                continue
            dones[index] = item
            for chunk in reply.held_chunks(item):
                yield sse(chunk)
            yield sse(reply.chunk({}, reply.finish_reason(item)))
        if replies[0].include_usage:
            yield sse(replies[0].usage_chunk(*(dones[i] for i in range(len(replies)))))
        yield sse("[DONE]")
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(index: int, turn: Turn, queue: asyncio.Queue[tuple[int, StreamItem]]) -> None:
    async with aclosing(events(turn)) as items:
        async for item in items:
            await queue.put((index, item))
