"""App factory and the ``start_llm_server`` entry point.

``create_app`` wires routers, error handlers and a lifespan that builds the engine (the
model loads there, never at import) and keeps it on ``app.state``. ``main`` reads
``server_config.yaml`` and runs uvicorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from llm_server.api import routes_chat, routes_ops, routes_openai, routes_page
from llm_server.api.errors import install_error_handlers
from llm_server.engine.interface import Engine

EngineFactory = Callable[[], Engine]


def create_app(engine_factory: EngineFactory) -> FastAPI:
    """Build the app; ``engine_factory`` runs in the lifespan (tests pass a fake)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_factory()
        engine.start()
        app.state.engine = engine
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="llm_server", lifespan=lifespan)
    install_error_handlers(app)
    for module in (routes_ops, routes_chat, routes_openai, routes_page):
        app.include_router(module.router)
    return app


def main() -> None:
    """Console script ``start_llm_server`` (flags: --host, --port, --config-dir)."""
    raise SystemExit("not implemented yet")
