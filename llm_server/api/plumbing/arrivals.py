"""Tell the engine a request is coming as soon as it arrives, so a burst is admitted together.

A generation request (any ``POST``, and the spec's ``GET /chat/...`` forms) is announced to the
engine (``Engine.arriving()``, :mod:`llm_server.engine.arrivals`) when its HTTP request starts,
before its body is read and parsed. The announcement is put on ``request.state.arrival`` and ends
when the turn is submitted (:func:`~llm_server.api.protocols.turns.open_turn`), or at the latest
when the response starts or the request ends (a refusal, a validation error, a non-generation
POST). An idle engine holds its next admission (at most 25 ms) while announced requests are still
on their way, so sixteen clients sending at once share one prefill instead of the first going
alone and the other fifteen waiting for its whole step.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Where the announcement lives on ``request.state`` (``scope["state"]``).
ARRIVAL_STATE_KEY = "arrival"


def _generates(scope: Scope) -> bool:
    return scope["method"] == "POST" or (scope["method"] == "GET" and scope.get("path", "").startswith("/chat/"))


class ArrivalMiddleware:
    """Announces generation requests to the app's engine (see the module docstring)."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine: Any = getattr(self.fastapi_app.state, "engine", None)
        if scope["type"] != "http" or engine is None or not _generates(scope):
            await self.app(scope, receive, send)
            return
        arrival = engine.arriving()
        scope.setdefault("state", {})[ARRIVAL_STATE_KEY] = arrival

        async def send_ending(message: Message) -> None:
            if message["type"] == "http.response.start":
                arrival.done()
            await send(message)

        try:
            await self.app(scope, receive, send_ending)
        finally:
            arrival.done()


__all__ = ["ARRIVAL_STATE_KEY", "ArrivalMiddleware"]
