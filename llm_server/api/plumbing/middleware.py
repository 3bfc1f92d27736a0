"""Request ids, access logs, request counting and the drain gate, as one ASGI middleware.

Every HTTP request gets an id: the incoming ``X-Request-Id`` when it is sane (printable,
at most 128 characters), else a new one. The id is put on ``request.state.request_id``
(with the arrival time on ``request.state.started_at``), returned in the ``X-Request-Id``
response header, and set in the request context so it shows in every log line
(:mod:`llm_server.api.plumbing.request_context`). Each request is counted in
``llm_server_requests_total{endpoint, status}`` (endpoint = the route template, so ids in
paths never explode the label set).

A client that leaves before its response ended (streamed or not) is logged and counted as 499
(:mod:`llm_server.api.plumbing.response_end`). The access log line holds method, path, status and
duration — never the query string (it may carry ``x_api_key``) nor bodies (prompts); successful
``/health`` and ``/metrics`` hits log at DEBUG so probes do not flood the log. Control
characters in the path are escaped (a ``%0D%0A`` in a URL cannot forge a log line). A crash is
answered here with an OpenAI-shaped 500 that still carries the request id. While the server
drains (SIGTERM) every request except ``/health`` and ``/metrics`` is refused with 503.

It is a plain ASGI middleware (not ``BaseHTTPMiddleware``) so streamed responses and
client disconnects pass through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server.api.plumbing.drain import drain_state
from llm_server.api.plumbing.errors import APIError, error_response
from llm_server.api.plumbing.request_context import (
    REQUEST_ID_HEADER,
    configure_logging,  # noqa: F401  re-exported for server.main
    escape_controls,
    install_log_record_factory,
    request_id_var,
)
from llm_server.api.plumbing.response_end import ResponseEnd
from llm_server.serving.metrics import PREFIX

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("llm_server.access")

REQUESTS = Counter(
    f"{PREFIX}_requests",  # exposed as llm_server_requests_total
    "HTTP requests by endpoint (route template) and status code.",
    ["endpoint", "status"],
)
#: Seconds a client is told to wait (``Retry-After``) before retrying elsewhere while we drain.
DRAINING_RETRY_AFTER_S = 5
_HEADER_NAME = REQUEST_ID_HEADER.encode()
_SANE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
#: Probe and scrape endpoints: they still answer while the server drains (so the orchestrator
#: sees "draining" and scrapes go on), and their successful hits are logged at DEBUG.
_PROBE_PATHS = ("/health", "/metrics")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _HEADER_NAME:
            text = value.decode("latin-1").strip()
            return text if _SANE_ID.match(text) else None
    return None


def _endpoint_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started_at"] = started
        token = request_id_var.set(request_id)
        status: int | None = None
        header = (_HEADER_NAME, request_id.encode("latin-1"))

        ending = ResponseEnd()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), header]}
            ending.sent(message)
            await send(message)

        async def receive_watched() -> Message:
            message = await receive()
            ending.received(message)
            return message

        try:
            if drain_state(self.fastapi_app).draining and scope["path"] not in _PROBE_PATHS:
                await self._refuse_draining(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_watched, send_with_id)
        except Exception:
            if status is not None:  # the response already started: nothing left to answer
                raise
            # A crash: answer here (not in Starlette's outer error middleware) so the 500
            # carries the request id too.
            logger.exception("unhandled error on %s %s", escape_controls(scope["method"]),
                             escape_controls(scope.get("path", "")))
            crash = APIError(500, "internal server error", type="server_error")
            await error_response(crash)(scope, receive, send_with_id)
        finally:
            self._account(scope, ending.status(status), time.perf_counter() - started)
            request_id_var.reset(token)

    @staticmethod
    def _account(scope: Scope, status: int, elapsed: float) -> None:
        REQUESTS.labels(endpoint=_endpoint_label(scope), status=str(status)).inc()
        path = scope.get("path", "")
        level = logging.DEBUG if path in _PROBE_PATHS and status < 400 else logging.INFO
        access_logger.log(level, "%s %s -> %d in %.3fs", escape_controls(scope["method"]), escape_controls(path),
                          status, elapsed)

    async def _refuse_draining(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(
            503,
            "the server is shutting down; retry on another instance",
            code="server_shutting_down",
            headers={"Retry-After": str(DRAINING_RETRY_AFTER_S), "Connection": "close"},
        )
        await error_response(err)(scope, receive, send)


def install_middleware(app: FastAPI) -> None:
    """Add the request-context middleware to ``app`` and make log records carry request ids.

    Call once from ``create_app``, after the routers are included (order does not matter
    for correctness; it is the outermost user middleware either way if added last).
    """
    install_log_record_factory()
    drain_state(app)  # create it now, so /health and the gate share one object
    app.add_middleware(RequestContextMiddleware, fastapi_app=app)
