"""Edge cases of issue 12 through a real uvicorn server: client aborts, bad numbers, log forging,
half-sent bodies, readiness of /ping, one sampling rule for both APIs, the max_new_tokens cap.

Each test failed before its fix; each bad input also checks that the server is healthy after.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from llm_server.engine.types import SamplingParams
from tests.fakes import ScriptedEngine
from tests.spec_harness import API_KEY, LogCapture, error_of, serving, wait_until

HEADERS = {"X-API-Key": API_KEY}
LONG_WORDS = 5000
LONG_REPLY = " ".join(["word"] * LONG_WORDS)
MODEL = "scripted-model"


def make_settings(**changes: Any) -> ServerSettings:
    return ServerSettings(api_keys=(API_KEY,), max_new_tokens_limit=LONG_WORDS, **changes)


@pytest.fixture(scope="module")
def engine(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, reply="fine thanks", max_context=10 * LONG_WORDS)


@pytest.fixture(scope="module")
def base_url(engine: ScriptedEngine) -> Iterator[str]:
    greedy = SamplingParams(do_sample=False, temperature=0.7)
    with serving(create_app(lambda: engine, settings=make_settings(default_params=greedy))) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(engine: ScriptedEngine) -> None:
    engine.reply = "fine thanks"
    engine.delay_s = 0.0
    engine.fail_with = None


def healthy(base_url: str) -> bool:
    return requests.get(f"{base_url}/ping", headers=HEADERS, timeout=30).json() == {"status": "ok"}


def request_count(base_url: str, endpoint: str, status: str) -> float:
    text = requests.get(f"{base_url}/metrics", timeout=30).text
    wanted = f'llm_server_requests_total{{endpoint="{endpoint}",status="{status}"}}'
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


# --- 1. a client that leaves a non-streamed request -------------------------------------------
@pytest.mark.parametrize(("path", "body"), [
    ("/chat/blocking", {"prompt": "Write a long story", "max_new_tokens": LONG_WORDS}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Long story"}],
                              "max_tokens": LONG_WORDS}),
    ("/v1/completions", {"model": MODEL, "prompt": "Long story", "max_tokens": LONG_WORDS}),
])
def test_client_leaving_a_blocking_request_is_499_not_500(base_url: str, engine: ScriptedEngine, path: str,
                                                          body: dict[str, Any]) -> None:
    engine.reply = LONG_REPLY
    engine.delay_s = 0.02
    before_499 = request_count(base_url, path, "499")
    before_500 = request_count(base_url, path, "500")
    with LogCapture().attached("llm_server", "uvicorn.error") as logs:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=(10, 0.5))
        wait_until(lambda: engine.stats().running == 0, what="the generation to be cancelled")
        wait_until(lambda: request_count(base_url, path, "499") == before_499 + 1, what="a 499 to be counted")
    assert request_count(base_url, path, "500") == before_500
    assert not [line for line in logs.lines if "Traceback" in line or "unhandled" in line], logs.lines
    assert healthy(base_url)


# --- 2. seeds out of range --------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, -(2**64), 2**63, -(2**63) - 1])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_out_of_range_seed_is_400(base_url: str, seed: int, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "seed": seed}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})
    response = requests.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "seed"
    assert healthy(base_url)


def test_in_range_seeds_reach_the_engine(base_url: str, engine: ScriptedEngine) -> None:
    for seed in (0, 2**63 - 1, -(2**63)):
        body = {"model": MODEL, "seed": seed, "messages": [{"role": "user", "content": "Hi"}], "temperature": 1}
        assert requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS,
                             timeout=30).status_code == 200
        assert engine.requests[-1].params.seed == seed


# --- 3. log forging ---------------------------------------------------------------------------
def test_control_characters_in_the_path_cannot_forge_log_lines(base_url: str) -> None:
    forged = "/nokey%0D%0A2026-12-02%2016:00:01,000%20CRITICAL%20forged%1b[31m"
    with LogCapture().attached("llm_server") as logs:
        response = requests.get(f"{base_url}{forged}", timeout=30)
        wait_until(lambda: any("forged" in line for line in logs.lines), what="the access log line")
    assert response.status_code == 404
    line = next(line for line in logs.lines if "forged" in line)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line, line
    assert "\\r\\n2026-12-02" in line
    assert healthy(base_url)


def test_server_log_format_escapes_control_characters() -> None:
    from llm_server.api.plumbing.request_context import EscapingFormatter

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "model %s", ("a\nFAKE CRITICAL",), None)
    assert "\n" not in EscapingFormatter("%(message)s").format(record)


# --- 4. half-sent bodies ----------------------------------------------------------------------
def _half_sent(base_url: str, path: str, key: bool) -> socket.socket:
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    head += f"X-API-Key: {API_KEY}\r\n" if key else ""
    sock.sendall((head + "\r\n").encode() + b'{"prompt": "hal')
    return sock


@pytest.fixture(scope="module")
def quick_body_url(engine: ScriptedEngine) -> Iterator[str]:
    """A server whose bodies must arrive within 0.5 s (server.limits.request_body_timeout_s)."""
    with serving(create_app(lambda: engine, settings=make_settings(request_body_timeout_s=0.5))) as url:
        yield url


@pytest.mark.parametrize("key", [True, False])
def test_half_sent_body_times_out_with_408(quick_body_url: str, key: bool) -> None:
    base_url = quick_body_url
    sock = _half_sent(base_url, "/chat/blocking", key)
    with sock:
        answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "request_timeout" in answer
    assert healthy(base_url)


@pytest.mark.parametrize("key", [True, False])
def test_client_abort_mid_body_is_one_499_line(base_url: str, key: bool) -> None:
    path = "/v1/chat/completions"
    before_499 = request_count(base_url, path, "499") + request_count(base_url, "unmatched", "499")
    before_500 = request_count(base_url, path, "500") + request_count(base_url, "unmatched", "500")
    with LogCapture().attached("llm_server", "uvicorn.error") as logs:
        sock = _half_sent(base_url, path, key)
        time.sleep(0.2)
        sock.close()
        wait_until(lambda: request_count(base_url, path, "499") + request_count(base_url, "unmatched", "499")
                   == before_499 + 1, what="a 499 to be counted")
    assert request_count(base_url, path, "500") + request_count(base_url, "unmatched", "500") == before_500
    assert not [line for line in logs.lines if "Traceback" in line or "Exception" in line], logs.lines
    assert len([line for line in logs.lines if "499" in line]) == 1, logs.lines
    assert healthy(base_url)


# --- 6. numbers that underflow ----------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-300, 1e-50, 1e-9])
def test_a_temperature_that_rounds_to_zero_is_greedy(base_url: str, engine: ScriptedEngine,
                                                     temperature: float) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": temperature}
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 200
    assert engine.requests[-1].params.greedy
    spec = requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi", "temperature": temperature},
                         headers=HEADERS, timeout=30)
    assert spec.status_code == 200
    assert engine.requests[-1].params.greedy


def test_a_top_p_that_rounds_to_zero_is_greedy(base_url: str, engine: ScriptedEngine) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_p": 1e-300, "temperature": 1}
    assert requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30).status_code == 200
    assert engine.requests[-1].params.greedy


@pytest.mark.parametrize(("field", "value"), [
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("temperature", 1e300), ("top_p", 1.5),
])
def test_other_out_of_range_numbers_are_400(base_url: str, field: str, value: float) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], field: value}
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == field
    assert healthy(base_url)


# --- 8. small inconsistencies -----------------------------------------------------------------
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": "true"}),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stream": "true"}),
    ("/chat/stream", {"prompt": "Hi", "improvement": "true"}),
])
def test_booleans_are_strict_on_both_apis(base_url: str, path: str, body: dict[str, Any]) -> None:
    response = requests.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] in ("stream", "improvement")


def test_invalid_json_names_no_character_offset(base_url: str) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", data=b'{"model": "x", "messages": [',
                             headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
    error = error_of(response)
    assert response.status_code == 400
    assert error["param"] is None
    assert "not valid JSON" in error["message"]


def test_text_part_without_text_says_text_is_missing(base_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    error = error_of(response)
    assert response.status_code == 400
    assert error["param"] == "messages.0.content.0.text"
    assert "text" in error["message"] and "not supported" not in error["message"]


def test_role_error_lists_developer(base_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]}
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400
    assert "developer" in error_of(response)["message"]


def test_a_body_without_a_json_content_type_gets_a_clear_message(base_url: str) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", data=b'{"model": "x"}',
                             headers={**HEADERS, "Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert response.status_code == 400
    assert "application/json" in error_of(response)["message"]
    assert healthy(base_url)


# --- 9. /ping while the model loads -----------------------------------------------------------
def test_ping_says_loading_with_retry_after_until_the_model_is_ready(tokenizer: Any) -> None:
    from fastapi.testclient import TestClient

    from llm_server.api.ops.readiness import readiness

    app = create_app(lambda: ScriptedEngine(tokenizer), settings=make_settings())
    with TestClient(app) as client:
        readiness(app).status = "loading"
        response = client.get("/ping", headers=HEADERS)
        assert response.status_code == 503
        assert response.json()["status"] == "loading"
        assert int(response.headers["retry-after"]) >= 1
        readiness(app).status = "ready"
        assert client.get("/ping", headers=HEADERS).json() == {"status": "ok"}


# --- 10. one request -> sampling rule for both APIs -------------------------------------------
def test_temperature_on_chat_samples_like_v1(base_url: str, engine: ScriptedEngine) -> None:
    assert requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi", "temperature": 0.9},
                         headers=HEADERS, timeout=30).status_code == 200
    spec = engine.requests[-1].params
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.9}
    assert requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30).status_code == 200
    openai = engine.requests[-1].params
    assert not spec.greedy and spec.temperature == 0.9
    assert (spec.do_sample, spec.temperature, spec.top_p) == (openai.do_sample, openai.temperature, openai.top_p)


# --- 11. the max_new_tokens cap is logged -----------------------------------------------------
def test_a_capped_max_new_tokens_is_logged_at_start(engine: ScriptedEngine) -> None:
    from llm_server.api.server import log_configuration_caps
    from llm_server.helper_functionality.config_models import ModelSection

    settings = make_settings(model=ModelSection.model_validate({"parameters": {"max_new_tokens": 4 * LONG_WORDS}}))
    with LogCapture().attached("llm_server") as logs:
        log_configuration_caps(settings)
    line = next(line for line in logs.lines if "max_new_tokens" in line)
    assert str(4 * LONG_WORDS) in line and str(LONG_WORDS) in line and "limits.max_new_tokens" in line


def test_python_dash_m_reads_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m llm_server.api.server --port N`` (found by the soak: it served on 8000 instead)."""
    import sys
    import types

    from llm_server.api import server

    fake_main = types.SimpleNamespace(__spec__=types.SimpleNamespace(name="llm_server.api.server"))
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    monkeypatch.setattr(sys, "argv", ["/x/llm_server/api/server.py", "--port", "9"])
    assert server._command_line() == ["--port", "9"]
