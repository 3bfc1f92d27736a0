"""Slow clients cannot hold connections: a deadline for the request head (line and headers).

uvicorn times out idle keep-alive connections, and the body-size middleware
(:mod:`llm_server.api.plumbing.limits`) gives a request body ``request_body_timeout_s`` to arrive; but
nothing bounds the time a client takes to send its request *head*: a slowloris client that
sends half a request line and then one byte now and then holds its connection (and a file
descriptor) for ever. The ASGI app cannot help, since it only sees a request once its head is
complete, so the deadline belongs to the HTTP protocol: :func:`http_protocol` returns
uvicorn's httptools protocol with a head timer, passed to uvicorn as ``Config(http=...)``
(:func:`llm_server.api.ops.shutdown.run_server` does). The timer starts when a connection opens
(or, on a kept-alive connection, when the next request's first byte arrives) and stops once
the headers are complete; if it fires, the server answers ``408 Request Timeout`` and closes
the connection, as nginx does after ``client_header_timeout`` (60 s there; 30 s here).

A reverse proxy in front (nginx, Envoy) usually enforces the same; this makes the server safe
without one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

_TIMEOUT_BODY = b"the request head did not arrive in time\n"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


def http_protocol(head_timeout_s: float) -> Any:
    """uvicorn's httptools protocol class with a ``head_timeout_s`` deadline (see the module
    docstring); ``"auto"`` (uvicorn's own choice, no head deadline) if httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools ships with uvicorn[standard]
        logger.warning("httptools is not installed: no request-head timeout (pip install httptools)")
        return "auto"

    class HeadTimeoutProtocol(HttpToolsProtocol):
        """HttpToolsProtocol whose request heads must arrive within ``head_timeout_s``."""

        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:  # a kept-alive connection's next request: from its first byte
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

    return HeadTimeoutProtocol
