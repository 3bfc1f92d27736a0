"""Issue 24 D6-D8 and the minor findings, through a real uvicorn server: 499 for a client that left
mid-answer (streamed or not), the stop-string limit, the improvement rule in the OpenAPI document,
HEAD on GET routes, repeated JSON keys (last wins, in every protocol)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from llm_server.api.protocols.openai_wire import MAX_STOP_SEQUENCES
from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from tests.fakes import ScriptedEngine
from tests.spec_harness import API_KEY, LogCapture, error_of, serving, wait_until

HEADERS = {"X-API-Key": API_KEY}
MODEL = "scripted-model"
LONG = " ".join(["word"] * 400)


@pytest.fixture(scope="module")
def engine(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, reply="fine thanks", max_context=100_000)


@pytest.fixture(scope="module")
def base_url(engine: ScriptedEngine) -> Iterator[str]:
    with serving(create_app(lambda: engine, settings=ServerSettings(api_keys=(API_KEY,),
                                                                    max_new_tokens_limit=1000))) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(engine: ScriptedEngine) -> None:
    engine.reply = "fine thanks"
    engine.delay_s = 0.0


def healthy(base_url: str) -> bool:
    return httpx.get(f"{base_url}/ping", headers=HEADERS, timeout=30).json() == {"status": "ok"}


def count(base_url: str, endpoint: str, status: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    line = f'llm_server_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


# --- D6: 499 for a client that left before the end --------------------------------------------
def leave_after_first_bytes(base_url: str, path: str, body: dict[str, Any]) -> None:
    parts = urlsplit(base_url)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {API_KEY}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + data)
        if body.get("stream"):
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream started: 200 is on the wire


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    ("/chat/stream", {"prompt": "hi", "stream": True}),
    ("/chat/blocking", {"prompt": "hi"}),
])
def test_a_client_that_leaves_mid_answer_is_499_in_log_and_metrics(base_url: str, engine: ScriptedEngine,
                                                                     path: str, body: dict[str, Any]) -> None:
    engine.reply, engine.delay_s = LONG, 0.01
    before_499, before_200 = count(base_url, path, "499"), count(base_url, path, "200")
    with LogCapture().attached("llm_server.access") as logs:
        leave_after_first_bytes(base_url, path, body)
        wait_until(lambda: count(base_url, path, "499") == before_499 + 1, what="a 499")
        wait_until(lambda: any("-> 499" in line for line in logs.lines), what="the 499 log line")
    assert count(base_url, path, "200") == before_200
    assert not [line for line in logs.lines if path in line and "-> 200" in line], logs.lines
    engine.delay_s = 0.0
    assert healthy(base_url)


def test_a_finished_stream_is_still_200(base_url: str) -> None:
    path = "/v1/chat/completions"
    before = count(base_url, path, "200")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert httpx.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=30).text.endswith("[DONE]\n\n")
    wait_until(lambda: count(base_url, path, "200") == before + 1, what="a 200")


# --- D7: the stop-string limit -----------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_too_many_stop_strings_is_a_400_that_gives_the_limit(base_url: str, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "stop": [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "stop" and str(MAX_STOP_SEQUENCES) in error["message"], error
    assert "unsupported" not in error["message"]
    body["stop"] = body["stop"][:MAX_STOP_SEQUENCES]
    assert httpx.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=30).status_code == 200


# --- D8: the improvement rule is in the OpenAPI document ---------------------------------------
def test_the_improvement_rule_is_documented_and_enforced(base_url: str) -> None:
    doc = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    operation = doc["paths"]["/v1/chat/completions"]["post"]
    assert "last message" in operation["responses"]["400"]["description"]
    request = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["improvement"]
    assert "last message" in request["description"]
    body = {"model": MODEL, "improvement": True,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400 and error_of(response)["param"] == "messages"


# --- minor: HEAD, repeated keys ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["/health", "/ping", "/metrics", "/v1/models", f"/v1/models/{MODEL}",
                                  "/chat/blocking?prompt=hi", "/chat/stream?prompt=hi", "/"])
def test_head_on_get_routes_is_the_get_without_a_body(base_url: str, path: str) -> None:
    got = httpx.get(f"{base_url}{path}", headers=HEADERS, timeout=30)
    head = httpx.head(f"{base_url}{path}", headers=HEADERS, timeout=30)
    assert head.status_code == got.status_code == 200, (head.status_code, got.status_code)
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert "HEAD" in httpx.options(f"{base_url}{path.split('?')[0]}", timeout=30).headers["allow"]


@pytest.mark.parametrize("path,raw", [
    ("/chat/blocking", b'{"prompt": "first", "prompt": "second"}'),
    ("/v1/completions", b'{"model": "x", "prompt": "first", "model": "%s", "prompt": "second"}' % MODEL.encode()),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "first"}], '
                             b'"messages": [{"role": "user", "content": "second", "content": "third"}]}'
     % MODEL.encode()),
])
def test_a_repeated_json_key_takes_its_last_value_in_every_protocol(base_url: str, engine: ScriptedEngine,
                                                                     path: str, raw: bytes) -> None:
    response = httpx.post(f"{base_url}{path}", content=raw, headers={**HEADERS, "Content-Type": "application/json"},
                          timeout=30)
    assert response.status_code == 200, response.text
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    assert ("second" in prompt or "third" in prompt) and "first" not in prompt, prompt
