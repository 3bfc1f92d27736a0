"""App factory, and the spec's entry point ``main`` for one server.

``create_app`` wires routers, error handlers, middleware and a lifespan that, at start-up,
loads the API keys (``app.state.keys``; a failure stops the start) and then starts the model
load in a background thread (:class:`~llm_server.api.ops.readiness.ModelLoader`; the model loads
there, never at import) and returns at once: the server accepts connections while the model
loads, ``/health`` answers 503 ``loading`` and the chat endpoints 503 with ``Retry-After``
until ``app.state.engine`` and the :class:`ChatService` (``app.state.chat``) are up.

``main`` (the spec's ``from llm_server.api.server import main; main()``) reads the YAML
configuration (``--config-dir``), checks the API keys *before* the slow model load (an
unreachable Key Vault exits non-zero at once), and runs uvicorn with graceful shutdown
(:func:`serve`). If the model then fails to load, the server stops and the process exits with
status 1 (a crash-looping process an operator notices, not a server that never gets ready).
The ``start_llm_server`` command (:mod:`llm_server.cli`) adds the choice of Ray Serve on top.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI

from llm_server.api.ops import routes as ops_routes
from llm_server.api.ops.readiness import FailureHook, ModelLoader, readiness
from llm_server.api.ops.shutdown import run_server
from llm_server.api.page import routes as page_routes
from llm_server.api.plumbing.allowed_methods import OptionsMiddleware, allow_header
from llm_server.api.plumbing.arrivals import ArrivalMiddleware
from llm_server.api.plumbing.auth import KeyStore, build_key_store, install_log_redaction
from llm_server.api.plumbing.errors import install_error_handlers
from llm_server.api.plumbing.head import HeadAsGetMiddleware
from llm_server.api.plumbing.keyvault import KeyVaultError
from llm_server.api.plumbing.limits import BodySizeLimitMiddleware
from llm_server.api.plumbing.middleware import configure_logging, install_middleware
from llm_server.api.plumbing.openapi_doc import install_openapi
from llm_server.api.protocols import (
    anthropic_routes,
    openai_routes,
    responses_routes,
    spec_chat,
    tokenize_routes,
)
from llm_server.api.settings import ServerSettings, load_settings
from llm_server.engine.heap_policy import apply_server_heap_policy
from llm_server.engine.interface import Engine
from llm_server.engine.wait_policy import apply_server_wait_policy
from llm_server.helper_functionality.yaml_loading import ConfigError, set_config_dir
from llm_server.serving.service import ChatService

logger = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]


def _configured_engine(settings: ServerSettings) -> EngineFactory:
    """The model of ``model_config.yaml`` in the batching engine (imports torch only when called)."""

    def build() -> Engine:
        from llm_server.engine.loader import load_engine

        return load_engine(settings.model, settings.engine, settings.served_model_name)

    return build


def log_configuration_caps(settings: ServerSettings) -> None:
    """Say at start when the server's limits cap a configured default (no silent caps)."""
    wanted = settings.model.parameters.max_new_tokens
    limit = settings.max_new_tokens_limit
    if isinstance(wanted, int) and wanted > limit:
        logger.warning(
            "model_config.yaml asks for max_new_tokens: %d, but this server's limit is %d, so answers "
            "default to %d new tokens; raise server.limits.max_new_tokens in server_config.yaml "
            "(or lower the model's max_new_tokens) to change this", wanted, limit, limit)


def create_app(
    engine_factory: EngineFactory | None = None,
    *,
    settings: ServerSettings | None = None,
    key_store: KeyStore | None = None,
    on_load_failure: FailureHook | None = None,
) -> FastAPI:
    """Build the app. ``engine_factory`` runs in the background model load (tests pass a fake
    engine); ``settings`` default to the YAML files; ``key_store`` defaults to
    :func:`build_key_store`; ``on_load_failure`` is called (from the load thread) if the
    model cannot be loaded. The app's readiness is :func:`llm_server.api.ops.readiness.readiness`.
    """
    apply_server_wait_policy()  # before torch loads: GOMP_SPINCOUNT=50000 unless the environment chose
    apply_server_heap_policy()  # glibc keeps a step's MB-sized tensors on the heap, unless MALLOC_* are set
    settings = settings if settings is not None else load_settings()
    log_configuration_caps(settings)
    factory = engine_factory or _configured_engine(settings)

    def build_engine() -> Engine:
        engine = factory()
        try:
            engine.start()
        except BaseException:
            engine.shutdown(0)
            raise
        return engine

    def make_chat(engine: Engine) -> ChatService:
        return ChatService(engine, settings.system_prompts, settings.max_new_tokens_limit, settings.default_params)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = key_store if key_store is not None else build_key_store(settings)
        await asyncio.to_thread(store.start)  # idempotent; raises when no key can be loaded
        app.state.keys = store
        loader = ModelLoader(app, build_engine, make_chat, on_load_failure)
        loader.start()  # the model loads in the background; requests get 503 until it is ready
        try:
            yield
        finally:
            engine = loader.close()
            if engine is not None:
                await asyncio.to_thread(engine.shutdown, settings.shutdown_timeout_s)
            store.stop()

    app = FastAPI(title="llm_server", lifespan=lifespan)
    app.state.settings = settings
    readiness(app)  # "loading" from the start, so /health never sees a missing state
    install_error_handlers(app, partial(allow_header, app))
    for module in (ops_routes, spec_chat, openai_routes, responses_routes, anthropic_routes, tokenize_routes,
                   page_routes):
        app.include_router(module.router)
    _add_middleware(app)
    install_openapi(app)
    install_middleware(app)  # request ids, access log, drain gate: outermost
    install_log_redaction()
    return app


def _add_middleware(app: FastAPI) -> None:
    """The ASGI middleware inside the outermost one (each added wraps those before it)."""
    app.add_middleware(BodySizeLimitMiddleware, limit=lambda: app.state.settings.max_body_bytes,
                       timeout_s=lambda: app.state.settings.request_body_timeout_s)
    app.add_middleware(OptionsMiddleware, fastapi_app=app)
    app.add_middleware(HeadAsGetMiddleware)  # HEAD on every GET route
    app.add_middleware(ArrivalMiddleware, fastapi_app=app)  # a burst of requests is admitted together


# --- command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The flags of one server (``llm_server.cli`` adds the scale-out ones)."""
    parser = argparse.ArgumentParser(
        prog="start_llm_server",
        description="Serve the configured chat model over HTTP (spec API, OpenAI API, chat page).",
    )
    parser.add_argument("--host", help="interface to bind "
                        "(default: server_config.yaml host / CHAT_SERVER_HOST, else 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to bind (default: server_config.yaml port)")
    parser.add_argument("--config-dir", help="folder with your own YAML files "
                        "(default: $LLM_SERVER_CONFIG_DIR, else the package's)")
    parser.add_argument("--open-access", action="store_true", help="serve WITHOUT any API key (explicit opt-out)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


#: Modules whose ``python -m`` runs the server (``__main__``'s spec name then).
_PROGRAM_MODULES = ("llm_server.api.server", "llm_server.cli", "llm_server.__main__")


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """``argv`` when given, else the process's arguments when we are the program (see :func:`_command_line`)."""
    return list(argv) if argv is not None else _command_line()


def _command_line() -> list[str]:
    """``sys.argv[1:]`` when we are the program (``start_llm_server``, ``python -m``), else ``[]``.

    ``main()`` called from Python (a notebook, another script) must not parse its host's
    arguments, e.g. Jupyter's ``-f kernel.json``.
    """
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    as_module = main_module is not None and main_module.name in _PROGRAM_MODULES  # not __name__: "__main__" then
    return sys.argv[1:] if program.startswith("start_llm_server") or as_module else []


def _fail(message: str, status: int) -> None:
    print(f"start_llm_server: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def settings_for(args: argparse.Namespace) -> ServerSettings:
    """The YAML configuration (``--config-dir``) with the command line's overrides; exits 2 when bad."""
    try:
        if args.config_dir:
            set_config_dir(args.config_dir)
        settings = load_settings()
    except ConfigError as exc:
        _fail(f"bad configuration: {exc}", 2)
    changes: dict[str, Any] = {}
    if args.host:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    if args.open_access:
        changes["open_access"] = True
    return settings.with_overrides(**changes)


def started_key_store(settings: ServerSettings) -> KeyStore:
    """The API keys, loaded now (exits 1 when Key Vault cannot be read)."""
    try:
        store = build_key_store(settings)
        store.start()
    except (KeyVaultError, ValueError) as exc:  # ValueError: a malformed vault URL
        _fail(f"{exc}\nThe server cannot check API keys without it, so it will not start. Check "
              "KEYVAULT_URL / API_KEY_SECRET_NAME (azure_config.yaml), the network, and that this "
              "identity may read the secret (DefaultAzureCredential).", 1)
    return store


def _stop_the_process(exc: BaseException) -> None:
    """``on_load_failure`` of the CLI: SIGTERM ourselves, so uvicorn stops the way it always does
    (the handler is uvicorn's, installed before the lifespan starts); ``main`` then exits 1."""
    logger.error("the model could not be loaded: stopping the server")
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> None:
    """The spec's entry point: one server (flags: --host, --port, --config-dir, --open-access)."""
    args = build_parser().parse_args(command_line(argv))
    configure_logging(args.log_level.upper())
    settings = settings_for(args)
    configure_logging(args.log_level.upper(), settings.log_format)  # the configured format, from here on
    serve(args, settings)


def serve(args: argparse.Namespace, settings: ServerSettings) -> None:
    """Run one server until SIGTERM/Ctrl+C; exits 1 if the model cannot be loaded."""
    store = started_key_store(settings)
    app = create_app(settings=settings, key_store=store, on_load_failure=_stop_the_process)
    run_server(app, host=settings.host, port=settings.port,
               shutdown_timeout_s=settings.shutdown_timeout_s, log_level=args.log_level,
               head_timeout_s=settings.request_head_timeout_s)
    state = readiness(app)
    if state.failed:
        _fail(f"the model could not be loaded ({state.error}); see the log above", 1)


if __name__ == "__main__":
    main()
