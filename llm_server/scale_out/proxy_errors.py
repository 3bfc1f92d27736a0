"""JSON error bodies from Serve's HTTP proxy when no replica wrote a response.

When the replica running a request dies (process killed, node lost) before it sent a
response, Serve's proxy sends nothing itself for that error (``RayActorError`` maps to 500
without a body); uvicorn then answers ``500`` with the plain-text body ``Internal Server
Error``. Serve's hook for the proxy is ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: the
import path of a function returning Starlette middlewares that wrap every proxy's ASGI app.
:func:`proxy_middlewares` is that function; its :class:`JsonProxyErrors` answers such a
request with the API's own error shape instead::

    500 {"error": {"message": "the replica serving this request failed before it answered; ...",
                   "type": "server_error", "param": null, "code": "replica_failed"}}

with the ``X-Request-ID`` Serve gave the request. Responses a replica (or the proxy) started are
left as they are: a stream cut mid-way cannot be turned into an error any more.

The same hook also installs :class:`~.affinity.SessionKeyMiddleware` (prefix affinity's session key).
The variable must be set in the proxies' environment: :func:`controller_options` is the
``serve.start(controller_options=...)`` value that does it (proxies inherit the controller's
environment variables); ``deploy/serve_config.yaml`` sets the same under ``controller_options``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server.api.plumbing.errors import APIError

logger = logging.getLogger(__name__)

#: Serve's environment variable naming the proxy middleware callback.
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: This module's callback, as Serve imports it.
CALLBACK_PATH = "llm_server.scale_out.proxy_errors:proxy_middlewares"
REPLICA_FAILED = APIError(
    500, "the replica serving this request failed before it answered; retry the request",
    type="server_error", code="replica_failed")


def controller_options() -> dict[str, Any]:
    """``serve.start``'s ``controller_options``: the proxies get :data:`CALLBACK_ENV`."""
    return {"runtime_env": {"env_vars": {CALLBACK_ENV: CALLBACK_PATH}}}


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares wrapped around each proxy (JSON errors outside,
    then the session key of prefix affinity, :mod:`.affinity`)."""
    from llm_server.scale_out.affinity import SessionKeyMiddleware

    return [Middleware(JsonProxyErrors), Middleware(SessionKeyMiddleware)]


def _request_id(scope: Scope) -> bytes | None:
    """The request id Serve's own middleware put on the request's headers."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            return bytes(value)
    return None


class JsonProxyErrors:
    """Answers an HTTP request the proxy left without a response with :data:`REPLICA_FAILED`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = gone = False

        async def watch_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        except Exception:  # noqa: BLE001 - answered below unless a response already started
            if started:
                raise
            logger.exception("Serve's proxy failed on %s", scope.get("path"))
        if not started and not gone:  # (a client that hung up needs no answer)
            await self._replica_failed(scope, send)

    @staticmethod
    async def _replica_failed(scope: Scope, send: Send) -> None:
        body = json.dumps(REPLICA_FAILED.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        request_id = _request_id(scope)
        if request_id is not None:
            headers.append((b"x-request-id", request_id))
        logger.warning("no replica answered %s %s (request id %s): answered 500 replica_failed",
                       scope.get("method"), scope.get("path"), (request_id or b"-").decode("latin-1"))
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": body})
