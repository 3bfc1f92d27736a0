"""A serving turn over HTTP: the engine client every protocol adapter shares.

Each chat request goes through the same steps, whatever its wire format:

1. :func:`open_turn` hands the adapter's :class:`~llm_server.serving.request.TurnRequest` to
   the ChatService (``app.state.chat``) in a worker thread (validation, grammar, chat template,
   eager submit); if the request's task is cancelled while the turn is being opened, the turn is
   stopped as soon as it exists, so no generation runs unowned. Refusals (bad input, too long,
   overloaded, unavailable) become HTTP errors here, before a response starts
   (:func:`api_error_for`). The opened :class:`Turn` reports to the request's metrics and is
   tracked for a shutdown cut.
2. Then exactly one of:
   - :func:`collect` runs the turn to its end for a non-streamed answer, abandoning it if
     the client disconnects first (the caller answers 499);
   - a :class:`TurnResponse` streams a body made from :func:`events`, and closes that
     body however the response ends (finished, client gone, error, never started).

Cancellation has one owner: the TurnStream (``llm_server.serving.turn_stream``) cancels its
own generation when its iteration ends early, and :meth:`Turn.stop` is the one place the HTTP
layer asks it to stop (client gone, shutdown), always with a :class:`Cancel` reason. The
adapters only translate events into their own format (spec text chunks, OpenAI JSON / SSE).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_server.api.ops.readiness import ready_chat
from llm_server.api.plumbing.arrivals import ARRIVAL_STATE_KEY
from llm_server.api.plumbing.drain import drain_state
from llm_server.api.plumbing.errors import APIError
from llm_server.api.plumbing.request_context import started_at
from llm_server.engine.types import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    InvalidRequest,
)
from llm_server.serving.metrics import RequestMetrics
from llm_server.serving.request import ChatInputError, TurnRequest
from llm_server.serving.turn_stream import Cancel, ChatDelta, ChatDone, ServerShuttingDown, TurnStream

logger = logging.getLogger(__name__)

#: Exceptions that are the client's or the engine's doing (mapped to 4xx/5xx, not crashes).
EXPECTED_ERRORS = (APIError, ChatInputError, EngineError)
#: Seconds a client is told to wait (``Retry-After``) when the engine is not available.
ENGINE_UNAVAILABLE_RETRY_AFTER_S = 5
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- errors -----------------------------------------------------------------------------------
def api_error_for(exc: Exception, *, context_param: str = "prompt",
                  param_names: Mapping[str, str] | None = None) -> APIError:
    """A serving / engine exception -> the OpenAI-shaped HTTP error a client sees.

    ``context_param`` names the field blamed for a too-long prompt (``prompt`` or
    ``messages``); ``param_names`` renames serving-layer fields to the route's own
    (e.g. ``max_new_tokens`` -> ``max_tokens`` on the OpenAI API).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ChatInputError):
        param = (param_names or {}).get(exc.param or "", exc.param)
        return APIError(400, str(exc), param=param, code=exc.code)
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param=context_param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=context_param, code="invalid_prompt")
    if isinstance(exc, ServerShuttingDown):
        return APIError(503, str(exc), code="server_shutting_down",
                        headers={"Retry-After": str(ENGINE_UNAVAILABLE_RETRY_AFTER_S)})
    if isinstance(exc, EngineOverloaded):
        return APIError(503, str(exc), code="overloaded", headers={"Retry-After": str(max(1, exc.retry_after_s))})
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc) or "the model is not available", code="model_unavailable",
                        headers={"Retry-After": str(ENGINE_UNAVAILABLE_RETRY_AFTER_S)})
    if isinstance(exc, EngineError):
        return APIError(500, f"generation failed: {exc}", type="server_error", code="generation_failed")
    return APIError(500, "internal server error", type="server_error")


ErrorMapper = Callable[[Exception], APIError]


# --- 1. opening -------------------------------------------------------------------------------
class Turn:
    """One HTTP request's opened TurnStream, and the one place the HTTP layer stops it."""

    def __init__(self, stream: TurnStream) -> None:
        self.stream = stream

    def stop(self, reason: Cancel) -> None:
        """Stop the turn's generation (thread-safe, idempotent, a no-op once it has ended)."""
        self.stream.cancel(reason)


async def open_turn(request: Request, turn: TurnRequest, to_api_error: ErrorMapper = api_error_for,
                    last: bool = True) -> Turn:
    """Open ``turn`` on the app's ChatService in a worker thread (grammars compile there).

    Refusals become :class:`APIError`. If this task is cancelled while the worker runs, it
    gives up at once; the worker still finishes (threads cannot be interrupted) and the
    turn it opened is stopped right away instead of generating for nobody. ``last``: the
    request's last turn (``n`` > 1 opens several); once it is queued, the request's arrival
    announcement ends.
    """
    chat = ready_chat(request)
    # announced when the request arrived (api/plumbing/arrivals.py); ended once its last turn is queued
    arrival = request.scope.get("state", {}).get(ARRIVAL_STATE_KEY) if last else None

    def opener() -> Turn:
        try:
            return Turn(chat.open(turn))
        finally:
            if arrival is not None:
                arrival.done()  # queued or refused: an idle engine no longer waits for it

    opening = _Opening(opener)
    try:
        opened = await anyio.to_thread.run_sync(opening.run, abandon_on_cancel=True)
    except BaseException as exc:
        opening.abandon()  # cancelled (or worse): whatever the worker opens is stopped
        if isinstance(exc, EXPECTED_ERRORS):
            raise to_api_error(exc) from exc
        raise
    opened.stream.observe(RequestMetrics(started_at(request)))
    app = request.scope.get("app")
    if app is not None:  # cut short, with an error, if it outlives a shutdown
        drain_state(app).track(opened)
    return opened


class _Opening:
    """One ``opener`` call in a worker thread, and who owns its result (thread-safe).

    Whichever comes second, the turn or :meth:`abandon`, stops the turn.
    """

    def __init__(self, opener: Callable[[], Turn]) -> None:
        self._opener = opener
        self._lock = threading.Lock()
        self._turn: Turn | None = None
        self._abandoned = False

    def run(self) -> Turn:
        turn = self._opener()
        with self._lock:
            self._turn = turn
            abandoned = self._abandoned
        if abandoned:
            turn.stop(Cancel.CLIENT_GONE)
            logger.info("request gone while its turn was opening: generation cancelled")
        return turn

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            turn = self._turn
        if turn is not None:
            turn.stop(Cancel.CLIENT_GONE)


# --- 2a. a non-streamed answer ----------------------------------------------------------------
@dataclass(frozen=True)
class Collected:
    """A stream run to its end: the text of its deltas and its ChatDone."""

    text: str
    done: ChatDone


async def collect(request: Request, turn: Turn,
                  to_api_error: ErrorMapper = api_error_for) -> Collected | None:
    """Run ``turn`` to its end; None if the client disconnected first (generation cancelled).

    Errors become :class:`APIError` (a server-side cut: 503). If this task is cancelled, the
    generation is too.
    """
    work = asyncio.ensure_future(_read_all(turn.stream))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    gone = True
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        gone = not work.done()
    finally:
        watcher.cancel()
        if gone:  # the client left (or this task was cancelled): abandon the stream
            turn.stop(Cancel.CLIENT_GONE)  # also when the reader has not started iterating it yet
            work.cancel()
            logger.info("client gone before the answer was complete: generation cancelled")
    if gone:
        await asyncio.gather(work, return_exceptions=True)  # let the cancelled reader finish
        return None
    try:
        return work.result()
    except EXPECTED_ERRORS as exc:
        logger.warning("generation failed: %s", exc)
        raise to_api_error(exc) from exc


async def _read_all(stream: TurnStream) -> Collected:
    parts: list[str] = []
    async for event in stream:
        if isinstance(event, ChatDelta):
            parts.append(event.text)
        elif isinstance(event, ChatDone):
            return Collected("".join(parts) + (event.held_text or ""), event)
    raise _no_result()


def _no_result() -> APIError:
    return APIError(500, "generation ended without a result", type="server_error")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- 2b. a streamed answer --------------------------------------------------------------------
@dataclass(frozen=True)
class StreamFailure:
    """The last item of :func:`events` when generation failed after the response started."""

    error: Exception


StreamItem = ChatDelta | ChatDone | StreamFailure


async def events(turn: Turn) -> AsyncGenerator[StreamItem, None]:
    """The stream's deltas, then its ChatDone; or, instead of the ChatDone, a final
    :class:`StreamFailure` (an error, a server-side cut, or a stream that ended without a result).

    For a response that has already started, where an error can only be reported in-band.
    Closing this iterator closes the stream's iteration (which cancels the generation).
    """
    try:
        async with aclosing(turn.stream.__aiter__()) as chat_events:
            async for event in chat_events:
                yield event
                if isinstance(event, ChatDone):
                    return
        yield StreamFailure(_no_result())
    except EXPECTED_ERRORS as exc:
        logger.warning("generation failed after the response started: %s", type(exc).__name__)
        yield StreamFailure(exc)
    except Exception as exc:  # never leave a client with a silently truncated answer
        logger.exception("stream crashed after the response started")
        yield StreamFailure(exc)


class TurnResponse(StreamingResponse):
    """A streamed body made from an opened :class:`Turn`, which it owns.

    Starlette stops iterating when the client disconnects but leaves the body generator to
    the garbage collector; this closes it when the response ends, however it ends, so the
    stream's iteration ends and the engine frees the slot at once. A body that never started
    never iterated the stream: that turn is stopped instead.
    """

    def __init__(self, body: AsyncIterator[str], turn: Turn | Sequence[Turn], media_type: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(body, media_type=media_type, headers={**_STREAM_HEADERS, **(headers or {})})
        self.turns = (turn,) if isinstance(turn, Turn) else tuple(turn)  # ``n`` choices: one turn each

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose: Any = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                for turn in self.turns:
                    turn.stop(Cancel.CLIENT_GONE)  # a no-op once its iteration has ended
