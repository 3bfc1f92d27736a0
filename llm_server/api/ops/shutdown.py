"""Graceful shutdown: on SIGTERM (or Ctrl+C) drain, then exit cleanly.

Sequence, driven by :func:`run_server` (what ``start_llm_server`` calls):

1. The signal marks the app's :class:`DrainState` as draining: ``/health`` answers 503
   ``{"status": "draining"}`` and every other new request gets an OpenAI-shaped 503 with
   ``Retry-After`` and ``Connection: close``.
2. uvicorn stops accepting connections, closes idle keep-alive ones, and lets in-flight
   requests (streams included) finish for up to ``shutdown_timeout_s``; any still running
   then are cancelled (their generations are cancelled with them).
3. The app's lifespan shutdown runs (the engine stops), and the process exits with status 0.

A second SIGTERM or SIGINT during the drain forces an immediate exit (as uvicorn's second
Ctrl+C): open generations are cut with the in-band error first, given a moment to reach
their clients, and the process exits.

The signal handler only records the request to stop (plain assignments: no lock, no thread,
no logging), so a signal arriving while another is being handled can never deadlock; the
drain itself starts in :meth:`GracefulServer.shutdown`, on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from llm_server.api.plumbing.drain import cut_deadline_s, drain_state
from llm_server.api.plumbing.slow_clients import http_protocol

logger = logging.getLogger(__name__)

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


#: On a forced exit (second signal), how long the cut generations get to send their in-band error.
FORCED_EXIT_FLUSH_S = 1.0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, plus: signals start draining, and a drained exit has status 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.fastapi_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Only record the request (a signal handler must not lock, log or start threads):
        the first signal asks for a drain, any later one for an immediate exit."""
        self._captured_signals.append(sig)
        if self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Drain (see the module docstring), outside the signal handler; a forced exit still
        ends the open generations with their in-band error before the process goes."""
        first = self._captured_signals[:1]
        name = signal.Signals(first[0]).name if first else "a stop request"
        logger.info("received %s: draining (running requests get up to %ss)", name,
                    self.config.timeout_graceful_shutdown)
        drain_state(self.fastapi_app).begin(cut_deadline_s(self.config.timeout_graceful_shutdown or 0))
        await super().shutdown(sockets)
        if self.force_exit:
            logger.warning("second stop signal: exiting now")
            await self._cut_and_flush(FORCED_EXIT_FLUSH_S)

    async def _cut_and_flush(self, flush_s: float) -> None:
        drain_state(self.fastapi_app).cut_open_streams()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_s
        while self.server_state.tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in self.server_state.tasks:
            task.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Like uvicorn's, without re-raising the signal afterwards (which would exit 143)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(
    app: FastAPI,
    *,
    host: str,
    port: int,
    shutdown_timeout_s: float = 30.0,
    log_level: str = "info",
    head_timeout_s: float = 30.0,
    **uvicorn_options: Any,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain as described in the module docstring.

    uvicorn's own access log is off: it would log query strings (``?x_api_key=...``); the
    request-context middleware logs requests without them. A request head (line and headers)
    must arrive within ``head_timeout_s`` (:mod:`llm_server.api.plumbing.slow_clients`). Extra keyword
    arguments go to ``uvicorn.Config`` (e.g. ``ssl_keyfile``/``ssl_certfile``).
    """
    uvicorn_options.setdefault("http", http_protocol(head_timeout_s))
    if "log_config" not in uvicorn_options and logging.getLogger().handlers:
        uvicorn_options["log_config"] = None  # uvicorn's records go through the root handler's format
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(round(shutdown_timeout_s))),
        **uvicorn_options,
    )
    GracefulServer(config, app).run()
    logger.info("server stopped")
