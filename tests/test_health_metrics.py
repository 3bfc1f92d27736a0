"""GET /health (readiness, no key) and GET /metrics (Prometheus text) on a live server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server, metric_value, wait_until

MODEL = "scripted-model"
USER = [{"role": "user", "content": "Hi."}]
REPLY = "alpha beta gamma delta"

Serve = Callable[..., tuple[str, ScriptedEngine]]


class NeverReadyEngine(ScriptedEngine):
    """An engine still loading: start() returns but it never becomes ready."""

    def start(self) -> None:
        pass


@pytest.fixture
def serve(tokenizer: Any) -> Iterator[Serve]:
    with ExitStack() as stack:

        def start(engine_cls: type[ScriptedEngine] = ScriptedEngine, metrics_require_key: bool = False,
                  **engine_kwargs: Any) -> tuple[str, ScriptedEngine]:
            engine = engine_cls(tokenizer, **{"reply": REPLY, **engine_kwargs})
            app = build_app(engine, metrics_require_key=metrics_require_key)
            return stack.enter_context(live_server(app)), engine

        yield start


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


# --- /health --------------------------------------------------------------------------------
def test_health_ok_without_a_key(serve: Serve) -> None:
    url, _ = serve()
    response = httpx.get(f"{url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0}
    assert httpx.head(f"{url}/health").status_code == 200  # some load balancers probe with HEAD


def test_health_reports_load_while_a_request_runs(serve: Serve) -> None:
    url, engine = serve(reply=" ".join(["w"] * 500), delay_s=0.02)
    stream = client(url).chat.completions.create(model=MODEL, messages=USER, stream=True, max_tokens=500)
    next(iter(stream))
    try:
        during = httpx.get(f"{url}/health")
        assert during.status_code == 200
        assert during.json()["status"] == "ok"
        assert during.json()["running"] == 1
    finally:
        stream.close()
    assert wait_until(lambda: httpx.get(f"{url}/health").json()["running"] == 0)


def test_health_503_loading(serve: Serve) -> None:
    url, _ = serve(engine_cls=NeverReadyEngine)
    response = httpx.get(f"{url}/health")
    assert response.status_code == 503
    assert response.json()["status"] == "loading"


def test_health_503_after_a_fatal_engine_error(serve: Serve) -> None:
    url, engine = serve()
    engine.kill()
    response = httpx.get(f"{url}/health")
    assert response.status_code == 503
    assert response.json()["status"] == "error"


# --- /metrics -------------------------------------------------------------------------------
def test_metrics_is_prometheus_text_and_needs_no_key_by_default(serve: Serve) -> None:
    url, _ = serve()
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {
        "llm_server_requests": "counter",
        "llm_server_time_to_first_token_seconds": "histogram",
        "llm_server_inter_token_latency_seconds": "histogram",
        "llm_server_e2e_request_latency_seconds": "histogram",
        "llm_server_prompt_tokens": "counter",
        "llm_server_generation_tokens": "counter",
        "llm_server_requests_waiting": "gauge",
        "llm_server_requests_running": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name


def test_metrics_move_after_requests(serve: Serve) -> None:
    url, engine = serve()
    chat_200 = {"endpoint": "/v1/chat/completions", "status": "200"}
    chat_401 = {"endpoint": "/v1/chat/completions", "status": "401"}
    before = {
        "ok": metric_value(url, "llm_server_requests_total", chat_200),
        "unauthorized": metric_value(url, "llm_server_requests_total", chat_401),
        "ttft": metric_value(url, "llm_server_time_to_first_token_seconds_count"),
        "itl": metric_value(url, "llm_server_inter_token_latency_seconds_count"),
        "e2e": metric_value(url, "llm_server_e2e_request_latency_seconds_count"),
        "prompt": metric_value(url, "llm_server_prompt_tokens_total"),
        "generated": metric_value(url, "llm_server_generation_tokens_total"),
    }
    client(url).chat.completions.create(model=MODEL, messages=USER)
    list(client(url).chat.completions.create(model=MODEL, messages=USER, stream=True))
    httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": USER})  # no key

    prompt_tokens = sum(len(r.prompt_ids) for r in engine.requests)
    words = len(REPLY.split(" "))
    # a request is counted once its response is fully sent: a moment after the client has it
    assert wait_until(lambda: metric_value(url, "llm_server_requests_total", chat_200) == before["ok"] + 2)
    assert wait_until(lambda: metric_value(url, "llm_server_requests_total", chat_401) == before["unauthorized"] + 1)
    assert metric_value(url, "llm_server_time_to_first_token_seconds_count") == before["ttft"] + 2
    assert metric_value(url, "llm_server_inter_token_latency_seconds_count") == before["itl"] + 2 * (words - 1)
    assert metric_value(url, "llm_server_e2e_request_latency_seconds_count") == before["e2e"] + 2
    assert metric_value(url, "llm_server_prompt_tokens_total") == before["prompt"] + prompt_tokens
    assert metric_value(url, "llm_server_generation_tokens_total") == before["generated"] + 2 * words


def test_metrics_running_gauge_follows_the_engine(serve: Serve) -> None:
    url, _ = serve(reply=" ".join(["w"] * 500), delay_s=0.02)
    stream = client(url).chat.completions.create(model=MODEL, messages=USER, stream=True, max_tokens=500)
    next(iter(stream))
    try:
        assert metric_value(url, "llm_server_requests_running") == 1
    finally:
        stream.close()
    assert wait_until(lambda: metric_value(url, "llm_server_requests_running") == 0)


def test_abandoned_stream_counts_as_cancelled(serve: Serve) -> None:
    url, engine = serve(reply=" ".join(["w"] * 500), delay_s=0.02)
    labels = {"finish_reason": "cancelled"}
    before = metric_value(url, "llm_server_generations_finished_total", labels)
    stream = client(url).chat.completions.create(model=MODEL, messages=USER, stream=True, max_tokens=500)
    next(iter(stream))
    stream.close()
    assert wait_until(lambda: engine.stats().running == 0)
    assert wait_until(lambda: metric_value(url, "llm_server_generations_finished_total", labels) == before + 1)


def test_metrics_key_switch(serve: Serve) -> None:
    url, _ = serve(metrics_require_key=True)
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # /health never needs a key


def test_health_during_concurrent_load(serve: Serve) -> None:
    """Several streams at once: /health stays 200 and counts them."""
    url, engine = serve(reply=" ".join(["w"] * 300), delay_s=0.02)
    streams = [client(url).chat.completions.create(model=MODEL, messages=USER, stream=True, max_tokens=300)
               for _ in range(3)]
    for s in streams:
        next(iter(s))
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok"
        assert health["running"] == 3
    finally:
        closers = [threading.Thread(target=s.close) for s in streams]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
    assert wait_until(lambda: engine.stats().running == 0)
