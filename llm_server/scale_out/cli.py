"""``start_llm_server --replicas N`` / ``--ray-address ADDR``: the server as a Ray Serve application.

:func:`run_scaled_out` is what ``main()`` calls when either flag is given. It checks that Ray
is installed (else a clear error naming the ``ray`` extra), checks the API keys once here
(an unreachable Key Vault stops the start before any replica loads a model), starts or joins
Ray, starts Serve's HTTP proxy on ``--host``/``--port``, deploys the application and blocks
until Ctrl-C / SIGTERM, then shuts the application down.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from llm_server.api.settings import ServerSettings
from llm_server.helper_functionality.yaml_loading import ConfigError

logger = logging.getLogger(__name__)

RAY_MISSING = ("--replicas / --ray-address need Ray Serve, which is not installed. "
               "Install the extra: pip install 'llm_server[ray]'")


def _fail(message: str, status: int) -> None:
    print(f"start_llm_server: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def ray_available() -> bool:
    """Whether ``ray.serve`` can be imported."""
    try:
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
    except (ImportError, ValueError):
        return False


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def run_scaled_out(settings: ServerSettings, replicas: int | None, ray_address: str | None,
                   check_keys: Callable[[ServerSettings], Any]) -> None:
    """Deploy the server on Ray Serve and serve until a stop signal (see the module docstring)."""
    if replicas is not None and replicas < 1:
        _fail(f"--replicas must be at least 1, got {replicas}", 2)
    if not ray_available():
        _fail(RAY_MISSING, 2)
    import ray
    from ray import serve

    from llm_server.scale_out.config import load_scale_out_config
    from llm_server.scale_out.deployment import build_application, pin_generated_key
    from llm_server.scale_out.proxy_errors import controller_options

    try:
        options = load_scale_out_config().with_replicas(replicas)
    except ConfigError as exc:
        _fail(f"bad configuration: {exc}", 2)
    settings = pin_generated_key(settings)
    check_keys(settings).stop()  # reachable Key Vault / valid keys, checked once before any replica
    ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port}, controller_options=controller_options())
    serve.run(build_application(settings, options), name=options.app_name, route_prefix=options.route_prefix)
    logger.info("serving %s replica(s) on http://%s:%d (Ctrl-C stops)",
                options.replicas if options.autoscaling is None else "autoscaled", settings.host, settings.port)
    try:
        _wait_for_signal()
    finally:
        _stop(options.app_name, local=ray_address is None, timeout_s=settings.shutdown_timeout_s + 15)


def _stop(app_name: str, local: bool, timeout_s: float) -> None:
    """Delete the application (replicas drain), and stop our own local Ray; a joined cluster keeps
    running. Bounded: a Ctrl-C in a terminal also reaches Ray's own processes, which may be gone."""
    import ray
    from ray import serve

    def graceful() -> None:
        serve.delete(app_name)
        with suppress(Exception):  # the metrics board outlives replicas, not the application
            ray.kill(ray.get_actor(f"{app_name}-metrics-board", namespace="llm_server"))
        if local:
            serve.shutdown()

    logger.info("stopping the Serve application %s", app_name)
    worker = threading.Thread(target=graceful, name="serve-stop", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logger.warning("Serve did not stop within %.0f s (Ray's processes may already be gone); exiting", timeout_s)
    ray.shutdown()
