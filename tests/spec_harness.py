"""Test helpers for the spec API: the real app on a real uvicorn server on loopback."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

API_KEY = "spec-test-key-1"
OTHER_KEY = "spec-test-key-2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_model(app: FastAPI, timeout_s: float = 60.0) -> None:
    """Wait until the app's background model load has finished; RuntimeError if it failed.

    The server accepts requests while the model loads (they get 503); tests that need a
    model wait here. Whether the engine itself reports ready is /health's business.
    """
    from llm_server.api.ops.readiness import readiness

    state = readiness(app)
    if not state.wait(timeout_s):
        raise RuntimeError("the server did not start in time: the model is still loading")
    if state.failed:
        raise RuntimeError(f"the server failed to start: {state.error}")


@contextmanager
def serving(app: FastAPI, *, access_log: bool = False, timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` (lifespan included) on uvicorn in a thread; yield its base URL once the
    model has loaded (:func:`wait_for_model`)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start (see the log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start in time")
        time.sleep(0.02)
    try:
        wait_for_model(app, timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` (a generous timeout: it bounds a failing test, it is not a latency check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class LogCapture(logging.Handler):
    """Collects formatted records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("urllib3"):  # the test's own HTTP client, not the server
            return
        self.lines.append(record.getMessage())

    @contextmanager
    def attached(self, *names: str) -> Iterator[LogCapture]:
        loggers = [logging.getLogger(n) for n in names]
        previous = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            for lg, level in zip(loggers, previous, strict=True):
                lg.removeHandler(self)
                lg.setLevel(level)


def error_of(response: Any) -> dict[str, Any]:
    """The OpenAI-shaped error object of a JSON error response."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]
