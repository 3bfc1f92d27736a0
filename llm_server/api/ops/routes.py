"""Operator endpoints: GET /health (no key) and GET /metrics (Prometheus text format).

``/health`` answers 200 ``{"status": "ok", "model", "running", "waiting"}`` when the
engine is ready, else 503 with ``status`` ``"loading"`` (the model is still loading / the
engine has not started), ``"draining"`` (shutting down) or ``"error"`` (the model failed to
load, or a fatal engine error). Load balancers and
Kubernetes probes use it as a readiness check.

``/metrics`` needs an API key only when ``server.metrics_require_key`` is true; the queue
gauges are refreshed from ``engine.stats()`` at each scrape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from llm_server.api.ops.readiness import readiness
from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.plumbing.drain import drain_state
from llm_server.engine.types import EngineStats
from llm_server.serving.metrics import update_engine_gauges

router = APIRouter(tags=["operations"])


def _stats(request: Request) -> tuple[Any, EngineStats | None]:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not readiness(request.app).ready:
        return None, None
    try:
        return engine, engine.stats()
    except Exception:  # noqa: BLE001 - a dying engine must not take /health down with it
        return engine, EngineStats(waiting=0, running=0, healthy=False, ready=False)


def _health_status(request: Request, stats: EngineStats | None) -> str:
    if drain_state(request.app).draining:
        return "draining"
    if readiness(request.app).failed:
        return "error"
    if stats is None:
        return "loading"
    if not stats.healthy:
        return "error"
    if not stats.ready:
        return "loading"
    return "ok"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return _health(request)


@router.head("/health")
async def health_head(request: Request) -> JSONResponse:
    return _health(request)


def _health(request: Request) -> JSONResponse:
    engine, stats = _stats(request)
    status = _health_status(request, stats)
    body: dict[str, Any] = {
        "status": status,
        "model": getattr(engine, "model_id", None),
        "running": stats.running if stats else 0,
        "waiting": stats.waiting if stats else 0,
    }
    runner = getattr(engine, "runner_name", None)
    if runner:  # which forward serves the model (batched or not), and why
        body.update(runner=runner, runner_reason=getattr(engine, "runner_reason", ""))
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def _check_metrics_key(request: Request) -> None:
    settings = getattr(request.app.state, "settings", None)
    if not getattr(settings, "metrics_require_key", False):
        return
    await require_api_key(request)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    await _check_metrics_key(request)
    update_engine_gauges(_stats(request)[1])
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
