"""The model loads in the background: the server answers while it loads (503 + Retry-After),
becomes ready without a restart, and a failed load is visible (503 "error") and, from the
``start_llm_server`` command, ends the process with a non-zero exit status."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llm_server.api.ops.readiness import readiness
from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from llm_server.engine.interface import Engine
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, SYSTEM_PROMPTS, free_port
from tests.spec_harness import wait_until

HEADERS = {"X-API-Key": API_KEY}
MODEL = "scripted-model"
USER = [{"role": "user", "content": "Hi."}]
SCRIPT = Path(sys.executable).with_name("start_llm_server")


def _settings() -> ServerSettings:
    return ServerSettings(api_keys=(API_KEY,), system_prompts=SYSTEM_PROMPTS, max_new_tokens_limit=64)


def _model_endpoints(url: str) -> list[httpx.Response]:
    """One request to every endpoint that needs the model."""
    chat = {"model": MODEL, "messages": USER}
    return [
        httpx.post(f"{url}/chat/blocking", json={"prompt": "Hi"}, headers=HEADERS),
        httpx.post(f"{url}/chat/stream", json={"prompt": "Hi"}, headers=HEADERS),
        httpx.get(f"{url}/chat/blocking", params={"prompt": "Hi"}, headers=HEADERS),
        httpx.get(f"{url}/chat/stream", params={"prompt": "Hi"}, headers=HEADERS),
        httpx.post(f"{url}/v1/chat/completions", json=chat, headers=HEADERS),
        httpx.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, headers=HEADERS),
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}, headers=HEADERS),
        httpx.get(f"{url}/v1/models", headers=HEADERS),
    ]


def _assert_503_retry_later(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 503, (response.request.url, response.text)
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


@pytest.fixture
def serve_app() -> Iterator[Callable[[Any], str]]:
    """Run an app on uvicorn in a thread WITHOUT waiting for its model (unlike the harnesses)."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        assert server.started
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=15)


def test_the_server_answers_503_while_the_model_loads_then_serves(tokenizer: Any,
                                                                  serve_app: Callable[[Any], str]) -> None:
    release = threading.Event()
    engine = ScriptedEngine(tokenizer, reply="Loaded and ready.")

    def slow_factory() -> Engine:
        release.wait(60)  # the model "loads" until the test lets it finish
        return engine

    app = create_app(slow_factory, settings=_settings())
    url = serve_app(app)
    try:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        for response in _model_endpoints(url):
            error = _assert_503_retry_later(response, "model_loading")
            assert "model is loading" in error["message"]
        with pytest.raises(openai.InternalServerError) as err:  # what an SDK user sees
            openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
                model=MODEL, messages=USER)
        assert err.value.status_code == 503
        ping = httpx.get(f"{url}/ping", headers=HEADERS)  # the spec's health check says "not yet" (issue 12)
        assert ping.status_code == 503 and ping.json()["status"] == "loading"
        assert int(ping.headers["retry-after"]) >= 1
        assert engine.requests == []
    finally:
        release.set()
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, what="the model to load")
    reply = httpx.post(f"{url}/chat/blocking", json={"prompt": "Hi"}, headers=HEADERS)
    assert reply.status_code == 200 and reply.json() == {"reply": "Loaded and ready."}


def test_a_failed_load_is_503_error_everywhere(serve_app: Callable[[Any], str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    def broken_factory() -> Engine:
        raise RuntimeError("weights are corrupt")

    app = create_app(broken_factory, settings=_settings())
    url = serve_app(app)
    assert readiness(app).wait(30)
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "error"
    for response in _model_endpoints(url):
        _assert_503_retry_later(response, "model_load_failed")
    assert any("weights are corrupt" in r.getMessage() or "weights are corrupt" in (r.exc_text or "")
               for r in caplog.records if r.name == "llm_server.api.ops.readiness"), caplog.text


def test_a_load_failure_calls_the_failure_hook(serve_app: Callable[[Any], str]) -> None:
    failures: list[BaseException] = []
    error = RuntimeError("out of memory while loading")

    def broken_factory() -> Engine:
        raise error

    serve_app(create_app(broken_factory, settings=_settings(), on_load_failure=failures.append))
    wait_until(lambda: bool(failures), what="the failure hook")
    assert failures == [error]


def test_start_llm_server_exits_nonzero_when_the_model_cannot_load(tmp_path: Path) -> None:
    """The real console script: keys are fine, the model id is not; the process must not linger."""
    (tmp_path / "model_config.yaml").write_text(
        'model:\n  id: "embedded:NoSuchModel"\n  device: "cpu"\n  served_name: "nothing"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KEYVAULT_URL", "API_KEY_SECRET_NAME")}
    env["CHAT_SERVER_API_KEY"] = "a-key-for-this-test"
    done = subprocess.run(
        [str(SCRIPT), "--config-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the model could not be loaded" in done.stderr
    assert "NoSuchModel" in done.stderr
    assert "a-key-for-this-test" not in done.stdout + done.stderr
