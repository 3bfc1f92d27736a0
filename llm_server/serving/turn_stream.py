"""TurnStream: one chat turn's engine passes as one async stream of typed events, and the one owner of its
cancellation.

A turn is a sans-IO generator of :data:`~llm_server.conversation_engine.improvement.Steps`
(a plain answer: :func:`single_pass`; improvement: ``improvement_steps``). The stream starts
with the turn's first pass already submitted (``ChatService.open`` submits it eagerly, so
input and capacity errors surface before a response starts), then drives the turn on the
event loop: each later pass is submitted (tokenizing and grammar compiling run briefly in the
loop's default executor), its engine events are read with ``async for``, and its text is sent
back to the turn. No thread is kept per request. A step may hold several independent passes
(improvement's stage 2 beside stage 1): they are submitted together, so the engine batches them,
and read in order; one the engine has no room for (``EngineOverloaded``) starts after the others.

Like vLLM's ``AsyncLLM.generate``, the generator that consumes the engine's output owns
cancellation: when its iteration ends early (break, ``aclose``, task cancelled, an error) it
cancels the pass in flight, and :meth:`TurnStream.cancel` (thread-safe) does the same for a
stream nobody iterates. Every reason to stop goes through that one method, named by a
:class:`Cancel` reason: the client went away or cancelled, a deadline passed, the server shuts
down (the iteration then raises :class:`ServerShuttingDown` instead of ending in a silently
truncated answer). Layers above only iterate, close or cancel it. Metrics watch the stream
through a :class:`StreamObserver`.

A turn that may call tools (``tools``) holds its text back (a call is only known once it
parses) and reports it, with the calls read out of it, in its :class:`ChatDone`. A turn that
records log-probabilities hands them out with :meth:`TurnStream.take_logprobs`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

from llm_server.conversation_engine.passes import Advance, Pass, Steps, advance, ask
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import EngineOverloaded, EngineUnavailable, Finished, FinishReason, TextDelta
from llm_server.serving.structured import LogprobReader, TokenText
from llm_server.serving.tools import ToolCall, ToolSet, parse_calls

#: Submits one later pass of a turn (blocking: tokenizes, compiles a schema, submits).
SubmitPass = Callable[[Pass], GenerationStream]


@dataclass(frozen=True)
class ChatDelta:
    """Text to show the client now (with intermediate steps: stage headings and stages too)."""

    text: str


@dataclass(frozen=True)
class ChatDone:
    """End of a turn. ``result`` holds the spec's ``last_result`` keys (``reply`` always)."""

    result: dict[str, str]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    #: Prompt tokens served from the engine's prefix cache (0 when nothing was reused).
    cached_tokens: int = 0
    #: A turn that could call tools: the calls read out of its text ...
    tool_calls: tuple[ToolCall, ...] = ()
    #: ... and the text that was held back instead of streamed (without the calls; None when
    #: nothing was held, "" when the reply was only calls).
    held_text: str | None = None
    #: Speculative decoding's draft tokens accepted / refused over the turn's passes (OpenAI's
    #: ``usage.completion_tokens_details`` prediction counts).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


ChatEvent = ChatDelta | ChatDone


class Cancel(Enum):
    """Why a turn stops before its end: the one argument of :meth:`TurnStream.cancel`."""

    READER_LEFT = "reader_left"  # its iteration ended early (break, aclose, task cancelled, error)
    CLIENT_GONE = "client_gone"  # the HTTP client disconnected (or never saw the stream open)
    DEADLINE = "deadline"  # a time limit passed
    SHUTDOWN = "shutdown"  # the server is shutting down: the iteration raises ServerShuttingDown


#: What a client is told when the server's shutdown cuts its answer short.
SHUTDOWN_MESSAGE = "the server is shutting down and cut this answer short; retry on another instance"


class ServerShuttingDown(EngineUnavailable):
    """A generation the server cut short because it is shutting down (503, or in-band)."""


class StreamObserver(Protocol):
    """Watches one stream (e.g. its metrics): text as it is delivered, and its end, once."""

    def on_text(self) -> None:
        """A non-empty delta is about to reach the consumer."""

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The turn ended: stop, length, cancelled or error (token counts 0 when not known)."""

    def on_queued(self, seconds: float) -> None:
        """A pass of the turn waited ``seconds`` in the engine's queue before it started."""


class _NoObserver:
    def on_text(self) -> None:
        return None

    def on_queued(self, seconds: float) -> None:
        return None

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        return None


def single_pass(messages: list[dict[str, str]]) -> Steps:
    """A plain turn: one pass, streamed as it comes; its text is the reply."""
    return {"reply": (yield from ask(Pass(messages, show=True)))}


class TurnStream:
    """Async iterable of ``ChatDelta``... then exactly one ``ChatDone``; errors raise.

    Iterate it once. Abandoning the iteration (break, task cancelled, client gone) cancels
    the generation, as does :meth:`cancel`.
    """

    def __init__(self, steps: Steps, opening: Advance, first: GenerationStream, submit: SubmitPass,
                 prompt_tokens: int, tools: ToolSet | None = None, logprobs: LogprobReader | None = None,
                 final_check: Callable[[str], None] | None = None) -> None:
        """``opening`` is ``advance(steps)``: texts before the first pass, and that pass, whose
        engine stream ``first`` is already submitted; ``submit`` starts each later pass.
        ``tools``: the reply may hold calls (text held back); ``logprobs``: recorded per token."""
        self._steps = steps
        self._opening = opening
        self._submit = submit
        self._lock = threading.Lock()
        self._current = [first]  # the engine streams of the pass(es) in flight
        self._stopped = False  # cancelled: no pass may start any more
        self._observer: StreamObserver = _NoObserver()
        self._reported = False
        #: Prompt tokens of the (first) pass, known before generation starts.
        self.prompt_tokens = prompt_tokens
        self._tools = tools
        self._logprobs = logprobs
        #: Why the turn was cancelled, or None.
        self.cancelled_by: Cancel | None = None
        #: Checks the text of a pass that ended "stop" (a schema's instance check); raises to end in error.
        self.final_check = final_check

    @property
    def holds_text(self) -> bool:
        """Whether text is held back to the end (the reply may hold tool calls)."""
        return self._tools is not None

    def take_logprobs(self) -> list[TokenText] | None:
        """The log-probabilities recorded since the last call (None when not requested)."""
        return None if self._logprobs is None else self._logprobs.take()

    def prompt_logprobs(self) -> list[TokenText] | None:
        """The prompt's tokens and log-probabilities (``TurnRequest.prompt_logprobs``; the first: None);
        None when not requested, or before the engine admitted the request."""
        return None if self._logprobs is None else self._logprobs.take_prompt()

    def observe(self, observer: StreamObserver) -> TurnStream:
        """Report this stream's text and end to ``observer``; returns self."""
        self._observer = observer
        return self

    def cancel(self, reason: Cancel) -> None:
        """Stop generating, for ``reason`` (thread-safe, idempotent, harmless after the end). The
        only way a turn's generation is cancelled; the first reason given is the one kept."""
        with self._lock:
            self._stopped = True
            if self.cancelled_by is None:
                self.cancelled_by = reason
        self._cancel_current()

    def _cancel_current(self) -> None:
        """Cancel the engine streams of the pass(es) in flight."""
        with self._lock:
            current = list(self._current)
        for stream in current:
            stream.cancel()

    def __aiter__(self) -> AsyncGenerator[ChatEvent, None]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[ChatEvent, None]:
        outcome = "cancelled"
        try:
            async with aclosing(self._turn()) as events:
                async for event in events:
                    if isinstance(event, ChatDelta):
                        self._observer.on_text()
                    else:
                        outcome = event.finish_reason
                        self._report(outcome, event.prompt_tokens, event.completion_tokens)
                    yield event
        except ServerShuttingDown:
            raise  # reported as cancelled already
        except Exception:
            outcome = "error"
            raise
        finally:
            if outcome in ("cancelled", "error"):
                self.cancel(Cancel.READER_LEFT)
                self._report(outcome, 0, 0)

    def _report(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if not self._reported:
            self._reported = True
            self._observer.on_finish(reason, prompt_tokens, completion_tokens)

    async def _turn(self) -> AsyncGenerator[ChatEvent, None]:
        """The turn's events: each pass's live text and the turn's own text, then its ChatDone."""
        step = self._opening
        streams: list[GenerationStream | None] | None = list(self._current)
        usage = _Usage()
        reason: FinishReason = "stop"
        while True:
            for text in step.texts:
                if text:
                    yield ChatDelta(text)
            if not step.passes:
                break
            if streams is None:
                if self._stopped:  # cancelled between two passes: start no more
                    yield self._cancelled("", usage.prompt, usage.completion)
                    return
                streams = await self._start(step.passes)
            ended: list[Finished] = []
            for one, stream in zip(step.passes, streams, strict=True):  # passes run together: read in order
                if stream is None:  # no room for it beside the others: it starts now
                    stream = (await self._start((one,)))[0]
                    assert stream is not None  # a pass submitted alone is refused by an exception
                async for event in self._pass_events(one, stream, ended):
                    yield event
            usage.add(ended)
            stopped = next((finished for finished in ended if finished.reason == "cancelled"), None)
            if stopped is not None:
                self._cancel_current()  # a pass run beside it is not left running
                yield self._cancelled(stopped.text, usage.prompt, usage.completion)
                return
            reason = ended[-1].reason
            step, streams = advance(self._steps, step.reply(tuple(finished.text for finished in ended))), None
        yield replace(self._done(step.result, reason, (usage.prompt, usage.completion, usage.cached)),
                      accepted_prediction_tokens=usage.accepted, rejected_prediction_tokens=usage.rejected)

    async def _pass_events(self, one: Pass, stream: GenerationStream,
                           ended: list[Finished]) -> AsyncGenerator[ChatDelta, None]:
        """One pass's live text (when it is shown); its Finished is appended to ``ended``. A pass whose
        ``stop_when`` turns true is cancelled in the engine and ends as "stop" with its text so far."""
        finished: Finished | None = None
        parts: list[str] = []
        stopped_here = False
        async for event in stream:
            if isinstance(event, TextDelta):
                if event.text and one.show and self._tools is None:
                    yield ChatDelta(event.text)
                if one.stop_when is not None and not stopped_here and event.text:
                    parts.append(event.text)
                    stopped_here = one.stop_when("".join(parts))
                    if stopped_here:
                        stream.cancel()
            else:
                finished = event
        assert finished is not None  # a GenerationStream ends with Finished or raises
        if stopped_here and finished.reason == "cancelled" and not self._stopped:
            finished = replace(finished, reason="stop")  # ended by its own stop_when, not by the turn
        if "waiting" in finished.timeline and "prefilling" in finished.timeline:
            self._observer.on_queued(finished.timeline["prefilling"] - finished.timeline["waiting"])
        if finished.reason == "stop" and self.final_check is not None:
            self.final_check(finished.text)  # never a "stop" that is not what was asked for
        ended.append(finished)

    def _done(self, result: dict[str, str], reason: FinishReason, usage: tuple[int, int, int]) -> ChatDone:
        """The turn's ChatDone; with tools, the held text split into content and calls."""
        if self._tools is None:
            return ChatDone(result, reason, *usage)
        text = result.get("reply", "")
        content, calls = parse_calls(text, self._tools)
        return ChatDone(result, reason, *usage, tool_calls=tuple(calls), held_text=content or "")

    def _cancelled(self, text: str, prompt_tokens: int, completion_tokens: int) -> ChatDone:
        """The turn's end when a pass was cancelled; raises if the server is shutting down."""
        if self.cancelled_by is Cancel.SHUTDOWN:
            self._report("cancelled", prompt_tokens, completion_tokens)
            raise ServerShuttingDown(SHUTDOWN_MESSAGE)  # never a silent truncation
        return ChatDone({"reply": text}, "cancelled", prompt_tokens, completion_tokens)

    async def _start(self, passes: tuple[Pass, ...]) -> list[GenerationStream | None]:
        return await asyncio.get_running_loop().run_in_executor(None, self._submit_owned, passes)

    def _submit_owned(self, passes: tuple[Pass, ...]) -> list[GenerationStream | None]:
        """Submit ``passes`` (in the executor; passes run together are submitted together, so the
        engine batches them); if the turn was cancelled meanwhile (even if its reader has gone),
        the new passes are cancelled at once, never left running. A pass the engine has no room
        for beside the first is None: it starts when its turn to be read comes."""
        streams = self._submit_all(passes)
        submitted = [stream for stream in streams if stream is not None]
        with self._lock:
            self._current = submitted
            stopped = self._stopped
        if stopped:
            for stream in submitted:
                stream.cancel()
        return streams

    def _submit_all(self, passes: tuple[Pass, ...]) -> list[GenerationStream | None]:
        """Each pass submitted in order; after an EngineOverloaded (the engine is full), the rest are None."""
        streams: list[GenerationStream] = []
        try:
            for one in passes:
                streams.append(self._submit(one))
        except EngineOverloaded:
            if not streams:
                raise
        except BaseException:  # the passes already submitted are not left running for nobody
            for stream in streams:
                stream.cancel()
            raise
        return [*streams, *[None] * (len(passes) - len(streams))]


@dataclass
class _Usage:
    """Token counts summed over a turn's passes."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    accepted: int = 0
    rejected: int = 0

    def add(self, ended: list[Finished]) -> None:
        for finished in ended:
            self.prompt += finished.prompt_tokens
            self.completion += finished.completion_tokens
            self.cached += finished.cached_tokens
            self.accepted += finished.accepted_prediction_tokens
            self.rejected += finished.rejected_prediction_tokens
