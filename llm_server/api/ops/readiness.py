"""Whether the model is loaded: the background model load and the app's readiness.

The app's lifespan starts :class:`ModelLoader` and returns at once, so the server accepts
connections while the model loads (a slow load is visible over HTTP instead of looking like
a dead port). Until the load finishes, ``app.state.engine`` and ``app.state.chat`` are not
set: ``/health`` answers 503 ``{"status": "loading"}`` and the chat endpoints answer 503
with ``Retry-After`` (:func:`ready_chat`). A failed load is logged, leaves the app answering
503 (``/health`` status ``"error"``) and calls the loader's ``on_failure`` hook (the
``start_llm_server`` command uses it to stop the process with a non-zero exit status).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

from fastapi import FastAPI, Request

from llm_server.api.plumbing.errors import APIError
from llm_server.engine.interface import Engine
from llm_server.serving.service import ChatService

logger = logging.getLogger(__name__)

LoadStatus = Literal["loading", "ready", "failed"]
#: Seconds a client is told to wait (``Retry-After``) while the model loads (or failed to).
MODEL_NOT_READY_RETRY_AFTER_S = 5


class Readiness:
    """Where the model load stands (thread-safe): ``loading`` -> ``ready`` | ``failed``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self.status: LoadStatus = "loading"
        self.error: str | None = None  # one line, for logs and the exit message (never a secret)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def mark_ready(self) -> None:
        with self._lock:
            self.status = "ready"
        self._settled.set()

    def mark_failed(self, error: BaseException) -> None:
        with self._lock:
            self.status = "failed"
            self.error = f"{type(error).__name__}: {error}"
        self._settled.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the load has finished, either way (True) or ``timeout_s`` passed (False)."""
        return self._settled.wait(timeout_s)


def readiness(app: FastAPI) -> Readiness:
    """The app's readiness (created on first use, kept on ``app.state.readiness``)."""
    state = getattr(app.state, "readiness", None)
    if not isinstance(state, Readiness):
        state = Readiness()
        app.state.readiness = state
    return state


def not_ready_error(app: FastAPI) -> APIError | None:
    """The 503 a model-backed endpoint answers now, or None when the model is ready."""
    state = readiness(app)
    if state.ready:
        return None
    headers = {"Retry-After": str(MODEL_NOT_READY_RETRY_AFTER_S)}
    if state.failed:
        return APIError(503, "the model failed to load; see the server log", code="model_load_failed",
                        headers=headers)
    return APIError(503, "the model is loading; retry shortly", code="model_loading", headers=headers)


def ready_chat(request: Request) -> ChatService:
    """The app's ChatService, or a 503 (``Retry-After``) while the model is loading or failed."""
    error = not_ready_error(request.app)
    if error is not None:
        raise error
    chat: ChatService = request.app.state.chat
    return chat


def ready_engine(request: Request) -> Engine:
    """The app's engine, or the same 503 as :func:`ready_chat`."""
    error = not_ready_error(request.app)
    if error is not None:
        raise error
    engine: Engine = request.app.state.engine
    return engine


FailureHook = Callable[[BaseException], None]


class ModelLoader:
    """Builds the engine in a daemon thread and publishes it on the app when it is up.

    ``build`` returns a started engine (the slow part: the model loads there). On success
    ``app.state.engine`` and ``app.state.chat`` are set, then the app is marked ready. If
    :meth:`close` ran first (the server is stopping), the new engine is shut down instead.
    """

    def __init__(self, app: FastAPI, build: Callable[[], Engine], make_chat: Callable[[Engine], ChatService],
                 on_failure: FailureHook | None = None) -> None:
        self.app = app
        self.build = build
        self.make_chat = make_chat
        self.on_failure = on_failure
        self.readiness = readiness(app)
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._load, name="model-load", daemon=True)

    def start(self) -> None:
        logger.info("loading the model (the server answers 503 until it is ready)")
        self._thread.start()

    def close(self) -> Engine | None:
        """Stop publishing; the engine to shut down now (None if the load has not finished)."""
        with self._lock:
            self._closed = True
            engine, self._engine = self._engine, None
        return engine

    def _load(self) -> None:
        try:
            engine = self.build()
            chat = self.make_chat(engine)
        except BaseException as exc:  # noqa: BLE001 - any load failure is reported (503 + /health), not lost
            self._fail(exc)
            return
        with self._lock:
            adopted = not self._closed
            if adopted:
                self._engine = engine
                self.app.state.engine = engine
                self.app.state.chat = chat
        if not adopted:
            logger.info("model loaded after shutdown began: stopping it")
            engine.shutdown(0)
            return
        self.readiness.mark_ready()
        logger.info("serving model %s (max context %d tokens)", engine.model_id, engine.max_context)

    def _fail(self, exc: BaseException) -> None:
        logger.error("loading the model failed: %s", exc, exc_info=exc)
        self.readiness.mark_failed(exc)
        if self.on_failure is not None and not self._closed:
            self.on_failure(exc)
