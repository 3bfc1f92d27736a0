"""An opened stream is always consumed or cancelled, even when the client goes away (or the
request is cancelled) while the stream is still being opened in its worker thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from llm_server.api.ops.readiness import readiness
from llm_server.api.protocols.turns import open_turn
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import GenerationRequest
from llm_server.serving.request import TurnRequest
from llm_server.serving.turn_stream import ChatDelta, ChatDone, ChatEvent
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server
from tests.spec_harness import wait_until

LONG_REPLY = " ".join(["word"] * 1000)  # x 50 ms per word: only a cancellation ends it in time


class GatedEngine(ScriptedEngine):
    """``submit`` (called while the stream opens, in a worker thread) waits for the test."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, reply=LONG_REPLY, delay_s=0.05, max_context=100_000)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.streams: list[GenerationStream] = []

    def submit(self, request: GenerationRequest) -> GenerationStream:
        self.entered.set()
        assert self.release.wait(60)
        stream = super().submit(request)
        self.streams.append(stream)
        return stream


@pytest.fixture
def gated(tokenizer: Any) -> Iterator[tuple[str, GatedEngine]]:
    engine = GatedEngine(tokenizer)
    with live_server(build_app(engine)) as url:
        yield url, engine
        engine.release.set()


def _send_then_hang_up(url: str, path: str, body: str) -> None:
    """Send a request over a raw socket and close the connection without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/stream", '{"prompt": "Hi", "max_new_tokens": 1000}'),
        ("/chat/blocking", '{"prompt": "Hi", "max_new_tokens": 1000}'),
        ("/v1/chat/completions", '{"model": "scripted-model", "messages": [{"role": "user", "content": "Hi"}], '
                                 '"stream": true, "max_tokens": 1000}'),
        ("/v1/chat/completions", '{"model": "scripted-model", "messages": [{"role": "user", "content": "Hi"}], '
                                 '"max_tokens": 1000}'),
        ("/v1/completions", '{"model": "scripted-model", "prompt": "Hi", "stream": true, "max_tokens": 1000}'),
    ],
)
def test_client_gone_while_the_stream_opens_cancels_its_generation(
    gated: tuple[str, GatedEngine], path: str, body: str
) -> None:
    url, engine = gated
    _send_then_hang_up(url, path, body)
    assert engine.entered.wait(30), "the request never reached the engine"
    time.sleep(0.3)  # ordering only: let the server see the closed connection before the open finishes
    engine.release.set()
    wait_until(lambda: bool(engine.streams), what="the submit to return")
    wait_until(lambda: engine.streams[0].cancelled, what="the orphaned generation to be cancelled")
    wait_until(lambda: engine.stats().running == 0, what="the engine to drop it")


# --- the same in process: the request's task is cancelled while the stream opens ----------------
class _FakeStream:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.observer: Any = None

    def cancel(self, reason: Any) -> None:
        self.cancelled.set()

    def observe(self, observer: Any) -> _FakeStream:
        self.observer = observer
        return self

    async def __aiter__(self) -> AsyncIterator[ChatEvent]:
        yield ChatDelta("never read")
        yield ChatDone({"reply": "never read"}, "stop", 1, 1)


class _Service:
    """A ChatService stand-in whose ``open`` runs the test's opener."""

    def __init__(self, opener: Any) -> None:
        self.opener = opener

    def open(self, turn: TurnRequest) -> Any:
        return self.opener()


def _request(opener: Any) -> Any:
    from fastapi import FastAPI
    from starlette.requests import Request

    app = FastAPI()
    readiness(app).mark_ready()
    app.state.chat = _Service(opener)
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "state": {}, "app": app})


def test_cancelling_the_request_while_opening_cancels_the_opened_stream() -> None:
    entered, release = threading.Event(), threading.Event()
    opened = _FakeStream()

    def opener() -> Any:
        entered.set()
        release.wait(30)
        return opened

    async def run() -> None:
        task = asyncio.ensure_future(open_turn(_request(opener), TurnRequest()))
        assert await asyncio.to_thread(entered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # the request gives up at once, without waiting for the worker
        release.set()
        assert await asyncio.to_thread(opened.cancelled.wait, 30)

    asyncio.run(run())


def test_an_open_that_completes_is_handed_over_untouched() -> None:
    opened = _FakeStream()

    async def run() -> Any:
        return await open_turn(_request(lambda: opened), TurnRequest())

    stream = asyncio.run(run()).stream
    assert stream is opened and not opened.cancelled.is_set()
    assert opened.observer is not None  # the request's metrics watch it
