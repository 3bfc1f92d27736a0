"""What runs inside each Serve replica: the app factory's FastAPI app, adapted to Serve.

:func:`build_replica_app` is the builder handed to ``@serve.ingress``; Serve calls it when a
replica starts, so the engine, the key store (and its Key Vault refresh thread) and the
metrics are per replica, built by the same :func:`~llm_server.api.server.create_app` as the
single-process server. On top of that app it:

- makes the lifespan wait until the model is loaded (a failed load fails the replica's start),
  so Serve routes requests only to replicas that can answer them;
- adds an ``X-Replica-Id`` response header (which replica answered);
- replaces ``/health`` with one that also reports the deployment (running replicas, Serve's
  status), and ``/metrics`` with every replica's series (see :mod:`.metrics`).

A client disconnect makes Serve cancel the replica's asyncio task; the app's routes already
cancel the generation when their task is cancelled, which frees the engine's sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server.api.ops import routes as ops_routes
from llm_server.api.ops.readiness import readiness
from llm_server.api.server import EngineFactory, create_app
from llm_server.api.settings import ServerSettings
from llm_server.serving.metrics import update_engine_gauges

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-replica-id"
#: The replica id outside Serve.
LOCAL = "local"
#: Seconds a deployment status read from the Serve controller is reused by /health.
_STATUS_TTL_S = 2.0


def replica_id() -> str:
    """This replica's id (Serve's unique id), or ``local`` outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica (tests of the app itself)
        return LOCAL


class ReplicaIdMiddleware:
    """Adds ``X-Replica-Id: <id>`` to every HTTP response, and leaves ``X-Request-Id`` to Serve's
    proxy, which adds the same id (the one it passed in, which the app logs) to every response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"x-request-id"]
                message = {**message, "headers": [*kept, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class DeploymentStatus:
    """Serve's view of this replica's deployment, read from the controller (cached briefly)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._at = 0.0
        self._value: dict[str, Any] = {}

    async def get(self) -> dict[str, Any]:
        if self.app_name == "":
            return {"status": "UNKNOWN", "message": "not running on Ray Serve"}
        if time.monotonic() - self._at > _STATUS_TTL_S:
            self._value = await asyncio.to_thread(self._read)
            self._at = time.monotonic()
        return self._value

    def _read(self) -> dict[str, Any]:
        try:
            from ray import serve

            application = serve.status().applications[self.app_name]
            deployment = next(iter(application.deployments.values()))
        except Exception as exc:  # noqa: BLE001 - the controller is restarting: report what we know
            return {"status": "UNKNOWN", "message": f"{type(exc).__name__}: {exc}"[:200]}
        states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        return {"status": str(getattr(deployment.status, "value", deployment.status)),
                "application": str(getattr(application.status, "value", application.status)),
                "replicas": states, "running_replicas": states.get("RUNNING", 0)}


def _wait_for_model(inner: Callable[[FastAPI], Any], publish: Callable[[FastAPI], Any]) -> Callable[[FastAPI], Any]:
    """The app's lifespan, returning only once the model is loaded (raising if it failed)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            state = readiness(app)
            await asyncio.to_thread(state.wait)
            if state.failed:
                raise RuntimeError(f"the model could not be loaded on this replica: {state.error}")
            publisher = asyncio.ensure_future(publish(app))
            try:
                yield
            finally:
                publisher.cancel()
                with suppress(asyncio.CancelledError):
                    await publisher

    return lifespan


def _swap_route(app: FastAPI, path: str, endpoint: Callable[..., Any]) -> None:
    """Serve ``path`` (GET/HEAD) with ``endpoint``: its route goes first, so it matches first
    (the app's own route stays, shadowed; included routers may not be flattened)."""
    app.add_api_route(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)
    app.router.routes.insert(0, app.router.routes.pop())


def _install_ops_routes(app: FastAPI, app_name: str, replica: str) -> None:
    status = DeploymentStatus(app_name if replica != LOCAL else "")

    async def health(request: Request) -> JSONResponse:
        own = await ops_routes.health(request)
        body = {**json.loads(bytes(own.body)), "replica": replica, "deployment": await status.get()}
        serving = own.status_code == 200 and body["deployment"].get("running_replicas", 1) >= 1
        return JSONResponse(body, status_code=200 if serving else 503)

    async def metrics(request: Request) -> Response:
        await ops_routes._check_metrics_key(request)
        update_engine_gauges(ops_routes._stats(request)[1])
        from llm_server.scale_out import metrics as scale_metrics

        texts = await _publish(app, app_name, replica, fetch=True)
        return Response(scale_metrics.merged_text(texts), media_type=CONTENT_TYPE_LATEST)

    _swap_route(app, "/health", health)
    _swap_route(app, "/metrics", metrics)


async def _publish(app: FastAPI, app_name: str, replica: str, fetch: bool = False) -> dict[str, str]:
    """Put this replica's metrics on the board; with ``fetch``, return every fresh snapshot."""
    from llm_server.scale_out import metrics as scale_metrics

    engine = getattr(app.state, "engine", None)
    if engine is not None:
        with suppress(Exception):
            update_engine_gauges(engine.stats())
    text = scale_metrics.own_text()
    if replica == LOCAL:  # not in a Serve replica: no board to share with
        return {replica: text}
    try:
        board = scale_metrics.board(app_name)
        await board.put.remote(replica, text)
        if fetch:
            texts: dict[str, str] = await board.fresh.remote(scale_metrics.STALE_AFTER_S)
            return texts
    except Exception as exc:  # noqa: BLE001 - the board is being restarted: this replica's own series still answer
        logger.warning("metrics board unavailable (%s): serving this replica's metrics only", exc)
    return {replica: text}


def build_replica_app(settings: ServerSettings, engine_factory: EngineFactory | None, app_name: str) -> FastAPI:
    """The FastAPI app of one replica (Serve calls this at replica start)."""
    replica = replica_id()
    app = create_app(engine_factory, settings=settings)

    async def publish_forever(running: FastAPI) -> None:
        from llm_server.scale_out.metrics import PUBLISH_EVERY_S

        while True:
            await _publish(running, app_name, replica)
            await asyncio.sleep(PUBLISH_EVERY_S)

    app.router.lifespan_context = _wait_for_model(app.router.lifespan_context, publish_forever)
    _install_ops_routes(app, app_name, replica)
    app.add_middleware(ReplicaIdMiddleware, replica=replica)
    logger.info("replica %s of application %s built", replica, app_name)
    return app
