"""Request body size and read-time limits, as a plain ASGI middleware (before any route parses anything).

A declared ``Content-Length`` above the limit is refused without reading the body (413); a
chunked body is read up to the limit and refused as soon as it goes over. A body that has not
fully arrived within ``server.limits.request_body_timeout_s`` (default
:data:`BODY_READ_TIMEOUT_S`) is answered 408 and its connection closed (a
half-sent or trickled body never holds a connection open for ever). A client that goes away
mid-body is a client abort: counted as 499 with one log line, and the app never runs.
Accepted bodies are replayed unchanged to the app, and later ``receive()`` calls
(disconnect detection) pass straight through. All of this happens before the key check,
so it holds without a key too. The buffered body and the query string are checked by
:mod:`llm_server.api.plumbing.text_guard` (lone surrogates, nesting depth, query size): 400 naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server.api.plumbing.errors import APIError, error_response
from llm_server.api.plumbing.text_guard import body_problem, query_problem

#: Seconds a request body may take to arrive, in all, before the server answers 408 (the default).
BODY_READ_TIMEOUT_S = 30.0
#: The status of a request whose client went away before the answer (nginx's convention; nobody
#: reads it, it is counted and logged). The one definition: the routes answer it too.
CLIENT_CLOSED_REQUEST = 499


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than ``limit()`` bytes with an OpenAI-shaped 413."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int],
                 timeout_s: Callable[[], float] = lambda: BODY_READ_TIMEOUT_S) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s  # server.limits.request_body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = query_problem(scope.get("query_string", b"")) if scope["type"] == "http" else None
        if problem is not None:
            await error_response(problem)(scope, receive, send)
            return
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(limit, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        timeout_s = self.timeout_s()
        deadline = loop.time() + timeout_s  # for the whole body: a trickle cannot stretch it
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await self._timed_out(timeout_s, scope, receive, send)
                return
            if message["type"] != "http.request":  # client gone before the body arrived
                await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)  # counted, never sent
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await self._refuse(limit, scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        if (problem := body_problem(b"".join(chunks))) is not None:  # lone surrogates, deep nesting
            await error_response(problem)(scope, receive, send)
            return
        await self.app(scope, _replay(chunks, None, receive), send)

    @staticmethod
    async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"request body is larger than this server's limit of {limit} bytes",
                       code="body_too_large", headers={"Connection": "close"})
        await error_response(err)(scope, receive, send)


    @staticmethod
    async def _timed_out(timeout_s: float, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"})
        await error_response(err)(scope, receive, send)


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    """A receive() that first returns the buffered body, then defers to the real one."""
    first: list[Message] = [pending] if pending is not None else [
        {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    ]

    async def replayed() -> Message:
        if first:
            return first.pop()
        return await receive()

    return replayed
