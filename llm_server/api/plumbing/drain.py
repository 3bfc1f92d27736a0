"""The drain state: whether the server is shutting down, and the generations still open.

Shared by the request middleware (its drain gate refuses new requests while draining), the
protocol adapters (each opened turn is tracked) and graceful shutdown (``api.ops.shutdown``,
which begins the drain on SIGTERM and cuts what outlives the deadline with the in-band error).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Protocol

from fastapi import FastAPI

from llm_server.serving.turn_stream import SHUTDOWN_MESSAGE, Cancel

logger = logging.getLogger(__name__)


class Cuttable(Protocol):
    """An open generation the server may cut short (an HTTP request's turn)."""

    def stop(self, reason: Cancel) -> None: ...


#: What a client whose answer was cut short by the shutdown deadline reads in-band.
SHUTDOWN_CUT_REASON = SHUTDOWN_MESSAGE


class DrainState:
    """Whether the server is shutting down (thread-safe; set once, never cleared), and the
    open generations, so those that outlive the shutdown timeout end with an error, not silently."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[Cuttable] = weakref.WeakSet()
        self._timer: threading.Timer | None = None

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def begin(self, cut_after_s: float | None = None) -> None:
        """Start draining; with ``cut_after_s``, cut the generations still open after that long."""
        self._event.set()
        with self._lock:
            if cut_after_s is None or self._timer is not None:
                return
            timer = self._timer = threading.Timer(cut_after_s, self.cut_open_streams)
        timer.daemon = True
        timer.start()  # outside the lock: nothing slow is done while holding it

    def track(self, stream: Cuttable) -> None:
        with self._lock:
            self._open.add(stream)

    def cut_open_streams(self) -> int:
        """Cut every open generation short (its client gets an in-band error); how many."""
        with self._lock:
            streams = list(self._open)
            self._open.clear()
        for stream in streams:
            stream.stop(Cancel.SHUTDOWN)
        if streams:
            logger.warning("shutdown timeout: cutting %d running request(s) short", len(streams))
        return len(streams)


def cut_deadline_s(shutdown_timeout_s: float) -> float:
    """When to cut open generations: a little before uvicorn cancels the requests, so the
    in-band error still reaches the clients."""
    margin = min(2.0, max(0.25, 0.2 * shutdown_timeout_s))
    return max(0.0, shutdown_timeout_s - margin)


def drain_state(app: FastAPI) -> DrainState:
    """The app's drain state (created on first use, kept on ``app.state.drain``)."""
    state = getattr(app.state, "drain", None)
    if not isinstance(state, DrainState):
        state = DrainState()
        app.state.drain = state
    return state




__all__ = ["SHUTDOWN_CUT_REASON", "Cuttable", "DrainState", "cut_deadline_s", "drain_state"]
