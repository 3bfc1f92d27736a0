"""Tell the engine a request is coming as soon as it arrives, so a burst is admitted together.

A request to a generating route (:data:`GENERATING_PATHS`) is announced to the engine
(``Engine.arriving()``, :mod:`llm_server.engine.arrivals`) as soon as its whole body has arrived
(a GET at once), before it is parsed, rendered and tokenized. A slow upload is not announced until
it ends, so it cannot hold the engine. The announcement is put on ``request.state.arrival`` and ends
when the turn is submitted (:func:`~llm_server.api.protocols.turns.open_turn`; with ``n`` > 1, the
last choice), or at the latest when the response starts or the request ends (a refusal, a
validation error). An idle engine holds its next admission (at most 25 ms) while announced requests are still
on their way, so sixteen clients sending at once share one prefill instead of the first going
alone and the other fifteen waiting for its whole step.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Where the announcement lives on ``request.state`` (``scope["state"]``).
ARRIVAL_STATE_KEY = "arrival"
#: The routes that generate (GET answers 405 on the /v1 ones: announced, ended at once).
GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                              "/chat/blocking", "/chat/stream"})


class ArrivalMiddleware:
    """Announces generation requests to the app's engine (see the module docstring)."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine: Any = getattr(self.fastapi_app.state, "engine", None)
        if (scope["type"] != "http" or engine is None or scope["method"] not in ("GET", "POST")
                or scope.get("path") not in GENERATING_PATHS):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        arrivals: list[Any] = []

        def announce() -> None:
            if not arrivals:
                arrivals.append(engine.arriving())
                state[ARRIVAL_STATE_KEY] = arrivals[0]

        def end() -> None:
            for arrival in arrivals:
                arrival.done()

        async def receive_announcing() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                announce()  # the whole body is here: the request is about to be opened
            return message

        async def send_ending(message: Message) -> None:
            if message["type"] == "http.response.start":
                end()
            await send(message)

        if scope["method"] == "GET":  # no body to wait for
            announce()
        try:
            await self.app(scope, receive_announcing, send_ending)
        finally:
            end()


__all__ = ["ARRIVAL_STATE_KEY", "GENERATING_PATHS", "ArrivalMiddleware"]
