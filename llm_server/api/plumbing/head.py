"""``HEAD`` on every ``GET`` route: answered as the GET, without its body (RFC 9110 §9.3.2).

Starlette adds HEAD to its own GET routes, but FastAPI's ``APIRoute`` does not, so some GET
paths answered ``HEAD`` with 405. This middleware runs a HEAD request as a GET and sends only
its status and headers. On a streamed GET (``/chat/stream``) it reports the client as gone as
soon as the head is sent, so no generation runs for a body nobody reads.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGetMiddleware:
    """Runs ``HEAD`` as ``GET`` and drops the body (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        head_sent = False
        ended = False

        async def send_head_only(message: Message) -> None:
            nonlocal head_sent, ended
            if message["type"] == "http.response.start":
                head_sent = True
                await send(message)
            elif message["type"] == "http.response.body" and not ended:
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def receive_until_head() -> Message:
            if head_sent:
                return {"type": "http.disconnect"}
            return await receive()

        await self.app({**scope, "method": "GET"}, receive_until_head, send_head_only)
