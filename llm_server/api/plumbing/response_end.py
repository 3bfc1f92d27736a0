"""Whether a response reached its end, or its client left first (499, nginx's "client closed request").

The request-context middleware (:mod:`llm_server.api.plumbing.middleware`) feeds a :class:`ResponseEnd`
every ASGI message the app sends and receives. A streamed answer whose client disconnects
mid-stream has already sent ``200`` in its head; without this, the access log and
``llm_server_requests_total`` would record that 200 for an answer nobody received in full.
"""

from __future__ import annotations

from starlette.types import Message

from llm_server.api.plumbing.limits import CLIENT_CLOSED_REQUEST


class ResponseEnd:
    """Tracks one HTTP request: the last body chunk sent, and a disconnect seen before it."""

    def __init__(self) -> None:
        self.complete = False
        self.client_left = False

    def sent(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True

    def received(self, message: Message) -> None:
        if message["type"] == "http.disconnect" and not self.complete:
            self.client_left = True

    def status(self, started: int | None) -> int:
        """The status to log and count: 499 when the client left before the end; 500 when no
        response started (a crash); else the status that was sent."""
        if self.client_left and not self.complete:
            return CLIENT_CLOSED_REQUEST
        return started if started is not None else 500
