"""The Serve application: one deployment whose replicas each run the server's FastAPI app.

:func:`build_application` turns :class:`~llm_server.api.settings.ServerSettings` and a
:class:`~.config.ScaleOutConfig` into a Serve ``Application`` (``@serve.ingress`` over
:func:`~.replica.build_replica_app`), ready for ``serve.run``. :func:`deployment_options` is
where Serve's defaults that would starve a batching engine are replaced (see :mod:`.config`),
and where the prefix-affinity router is chosen (:mod:`.affinity_router`).

:func:`pin_generated_key` matters when no API key is configured: the single-process server
generates a random key; N replicas must not generate N different ones, so the driver
generates it once and hands it to every replica.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from llm_server.api.plumbing.auth import announce_generated_key, generate_key
from llm_server.api.server import EngineFactory
from llm_server.api.settings import ServerSettings
from llm_server.scale_out.config import ScaleOutConfig
from llm_server.scale_out.replica import build_replica_app

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "LLMServer"


def pin_generated_key(settings: ServerSettings) -> ServerSettings:
    """Settings whose replicas all accept the same key: a key generated here if none is configured."""
    if settings.open_access or settings.uses_key_vault or settings.api_keys:
        return settings
    key = generate_key()
    announce_generated_key(key)
    return settings.with_overrides(api_keys=(key,))


def deployment_options(options: ScaleOutConfig, settings: ServerSettings) -> dict[str, Any]:
    """Keyword arguments of ``serve.deployment`` for ``options``."""
    threads = str(options.threads())
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    chosen: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": options.ongoing_requests(settings.engine),
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "health_check_timeout_s": options.health_check_timeout_s,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
    }
    if options.prefix_affinity:
        from ray.serve.config import RequestRouterConfig

        from llm_server.scale_out.affinity_router import ROUTER_PATH

        chosen["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_PATH,  # type: ignore[arg-type]  # pydantic's field takes a str
            request_router_kwargs={"max_imbalance": options.max_imbalance(settings.engine)})
    if options.autoscaling is not None:
        chosen["autoscaling_config"] = options.autoscaling.model_dump()
    else:
        chosen["num_replicas"] = options.replicas
    return chosen


def build_application(settings: ServerSettings, options: ScaleOutConfig,
                      engine_factory: EngineFactory | None = None) -> Application:
    """The Serve application of ``settings`` (``engine_factory``: tests pass a small model)."""
    app_name = options.app_name

    def build_app() -> Any:  # runs in each replica, at its start
        return build_replica_app(settings, engine_factory, app_name)

    class LLMServer:
        """One replica: the server's FastAPI app (its lifespan starts the engine)."""

    ingress = serve.ingress(build_app)(LLMServer)
    deployment = serve.deployment(**deployment_options(options, settings))(ingress)
    logger.info("Serve deployment: %s", {k: v for k, v in deployment_options(options, settings).items()
                                          if k not in ("ray_actor_options", "request_router_config")})
    return deployment.bind()
