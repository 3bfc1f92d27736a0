"""Shared helpers for the OpenAI-API, health/metrics, request-id and shutdown tests.

``build_app`` makes the real app around a :class:`~tests.fakes.ScriptedEngine`;
``live_server`` runs it in a real uvicorn on a free loopback port (in a thread), so the
official ``openai`` client talks plain HTTP to it, disconnects included.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tests.fakes import ScriptedEngine
from tests.spec_harness import wait_for_model

API_KEY = "test-key-123"
SYSTEM_PROMPTS = {"assistant": "You are a helpful assistant, kestrel.", "reviser": "You revise drafts, narwhal."}


def build_app(engine: ScriptedEngine, *, metrics_require_key: bool = False,
              api_keys: tuple[str, ...] = (API_KEY,)) -> FastAPI:
    """The real app (create_app) serving ``engine``, with ``api_keys`` (API_KEY alone by default)."""
    from llm_server.api.server import create_app
    from llm_server.api.settings import ServerSettings

    settings = ServerSettings(
        api_keys=api_keys,
        metrics_require_key=metrics_require_key,
        system_prompts=SYSTEM_PROMPTS,
        max_new_tokens_limit=1024,
    )
    return create_app(engine_factory=lambda: engine, settings=settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a background thread; yield its base URL once
    the model has loaded (the app answers 503 before that)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        wait_for_model(app)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_until(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until true or timeout (returns the last result)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval_s)


def metric_value(base_url: str, name: str, labels: dict[str, str] | None = None, *,
                 headers: dict[str, str] | None = None) -> float:
    """Scrape /metrics and return one sample's value (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", headers=headers or {}).text
    wanted = labels or {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                return float(sample.value)
    return 0.0

