"""Issue 24 D1-D3: lone surrogates, deep nesting and oversized queries are 400s naming the field;
client text never forges a log line (newlines, ANSI escapes, tracebacks included).

Each bad input is sent as raw bytes through a real uvicorn server; each test also checks the
server is still healthy after it.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llm_server.api.plumbing.request_context import LOG_FORMAT, EscapingFormatter, JsonLinesFormatter, RequestIdFilter
from llm_server.api.plumbing.text_guard import MAX_JSON_DEPTH, MAX_QUERY_BYTES
from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from tests.fakes import ScriptedEngine
from tests.spec_harness import API_KEY, error_of, serving

HEADERS = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
MODEL = "scripted-model"
LONE = "\\ud800"  # as it is written in JSON: an escaped high surrogate with no low half


@pytest.fixture(scope="module")
def engine(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, reply="fine thanks")


@pytest.fixture(scope="module")
def base_url(engine: ScriptedEngine) -> Iterator[str]:
    with serving(create_app(lambda: engine, settings=ServerSettings(api_keys=(API_KEY,)))) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(engine: ScriptedEngine) -> None:
    engine.fail_with = None


def healthy(base_url: str) -> bool:
    return requests.get(f"{base_url}/ping", headers=HEADERS, timeout=30).json() == {"status": "ok"}


def chat(content: str = "hi", model: str = MODEL) -> str:
    return f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{content}"}}]}}'


# --- D1: lone surrogates ------------------------------------------------------------------------
SURROGATE_BODIES = [
    ("/v1/chat/completions", chat(f"a{LONE}b"), "messages.0.content"),
    ("/v1/chat/completions", chat(model=f"m{LONE}"), "model"),
    ("/v1/chat/completions", chat(LONE + "\\udc00" + LONE), "messages.0.content"),  # a pair, then a lone one
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "{LONE}"}}', "prompt"),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["ok", "x{LONE}"]}}', "prompt.1"),
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [], "k{LONE}": 1}}', "k\ufffd"),
    ("/chat/blocking", f'{{"prompt": "x{LONE}"}}', "prompt"),
    ("/chat/stream", f'{{"prompt": "x", "history": [{{"role": "user", "content": "{LONE}"}}]}}',
     "history.0.content"),
]


@pytest.mark.parametrize("path,body,field", SURROGATE_BODIES)
def test_a_lone_surrogate_in_a_body_is_a_400_naming_the_field(base_url: str, path: str, body: str,
                                                               field: str) -> None:
    response = requests.post(f"{base_url}{path}", data=body.encode(), headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == field and error["code"] == "invalid_unicode", error
    assert field in error["message"] and "surrogate" in error["message"]
    assert healthy(base_url)


def test_a_paired_surrogate_escape_is_fine(base_url: str) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", data=chat("\\ud83d\\ude00").encode(),
                             headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("method", ["blocking", "stream"])
def test_a_lone_surrogate_in_the_get_history_is_a_400(base_url: str, method: str) -> None:
    history = f'[{{"role": "user", "content": "x{LONE}"}}]'
    response = requests.get(f"{base_url}/chat/{method}", params={"prompt": "hi", "history": history},
                            headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "history.0.content"
    assert healthy(base_url)


# --- D2: nesting and query size -----------------------------------------------------------------
def test_deep_nesting_in_a_get_query_parameter_is_a_400(base_url: str) -> None:
    for param in ("history", "response_format"):
        deep = "[" * 5000 + "]" * 5000
        response = requests.get(f"{base_url}/chat/blocking", params={"prompt": "hi", param: deep},
                                headers=HEADERS, timeout=30)
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] == "too_deeply_nested" and error["param"].startswith(param), error
    assert healthy(base_url)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/chat/blocking"])
def test_deep_nesting_in_a_body_is_a_400(base_url: str, path: str) -> None:
    for depth in (MAX_JSON_DEPTH + 5, 100_000):
        body = f'{{"prompt": "hi", "model": "{MODEL}", "x": {"[" * depth}{"]" * depth}}}'
        response = requests.post(f"{base_url}{path}", data=body.encode(), headers=HEADERS, timeout=30)
        assert response.status_code == 400, response.text
        assert error_of(response)["code"] == "too_deeply_nested"
    assert healthy(base_url)


def test_an_oversized_query_is_a_400(base_url: str) -> None:
    response = requests.get(f"{base_url}/chat/blocking", params={"prompt": "x" * (MAX_QUERY_BYTES + 1)},
                            headers=HEADERS, timeout=30)
    assert response.status_code == 400 and error_of(response)["code"] == "query_too_large"
    many = "&".join(f"p{i}=1" for i in range(200))
    response = requests.get(f"{base_url}/chat/blocking?prompt=hi&{many}", headers=HEADERS, timeout=30)
    assert response.status_code == 400 and error_of(response)["code"] == "query_too_large"
    assert healthy(base_url)


@pytest.mark.parametrize("value", ["yes", "on", "no", "2", ""])
def test_a_get_boolean_is_only_true_false_1_or_0(base_url: str, value: str) -> None:
    response = requests.get(f"{base_url}/chat/blocking", params={"prompt": "hi", "improvement": value},
                            headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "improvement"
    ok = requests.get(f"{base_url}/chat/blocking", params={"prompt": "hi", "improvement": "0"},
                      headers=HEADERS, timeout=30)
    assert ok.status_code == 200, ok.text


# --- D3: no forged log lines --------------------------------------------------------------------
FORGE = "x\r\n2026-12-06 05:00:00,000 CRITICAL llm_server [-] forged\x1b[31mred\x1b[0m\u2028\x00"
_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \[[^\]]*\] ")


class CountingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The server's handler, writing to a buffer, counting the records it writes."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(io.StringIO())
        self.setFormatter(formatter)
        self.addFilter(RequestIdFilter())
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        super().emit(record)

    def text(self) -> str:
        return self.stream.getvalue()  # type: ignore[no-any-return]


def send_forgeries(base_url: str, engine: ScriptedEngine) -> None:
    """The payload through every field that reaches the log: path, request id, model, content,
    stop, query, and an engine failure whose message (and traceback) quotes it."""
    text = json.dumps(FORGE)[1:-1]
    requests.get(f"{base_url}/{requests.utils.quote(FORGE)}", timeout=30)
    requests.get(f"{base_url}/ping", headers={"X-Request-Id": "ok\tid"}, timeout=30)
    requests.post(f"{base_url}/v1/chat/completions", data=chat(model=text).encode(), headers=HEADERS, timeout=30)
    requests.post(f"{base_url}/v1/chat/completions", data=chat(text + LONE).encode(), headers=HEADERS, timeout=30)
    requests.get(f"{base_url}/chat/blocking", params={"prompt": FORGE, "improvement": FORGE}, headers=HEADERS,
                 timeout=30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": FORGE}], "stop": [FORGE]}
    requests.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    engine.fail_with = RuntimeError(f"the engine choked on {FORGE!s}")
    requests.post(f"{base_url}/chat/blocking", json={"prompt": FORGE}, headers=HEADERS, timeout=30)
    requests.post(f"{base_url}/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS, timeout=30)
    engine.fail_with = None


def attached(handler: logging.Handler) -> Any:
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return lambda: (root.removeHandler(handler), root.setLevel(previous))


def test_client_text_never_forges_a_log_line(base_url: str, engine: ScriptedEngine) -> None:
    handler = CountingHandler(EscapingFormatter(LOG_FORMAT))
    detach = attached(handler)
    try:
        send_forgeries(base_url, engine)
    finally:
        detach()
    text = handler.text()
    lines = text.split("\n")[:-1]
    assert handler.records > 8 and len(lines) == handler.records, text
    assert all(_LINE.match(line) for line in lines), text
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text and "\x00" not in text
    assert "Traceback" in text or "choked" in text  # the failure was logged, on its one line
    assert healthy(base_url)


def test_json_lines_are_one_object_a_line(base_url: str, engine: ScriptedEngine) -> None:
    handler = CountingHandler(JsonLinesFormatter())
    detach = attached(handler)
    try:
        send_forgeries(base_url, engine)
    finally:
        detach()
    lines = handler.text().split("\n")[:-1]
    assert handler.records > 8 and len(lines) == handler.records
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "request_id", "message"} <= set(entries[0])
    assert any(FORGE in e["message"] or FORGE in e.get("exc_info", "") for e in entries)  # kept, escaped


def test_a_traceback_quoting_client_text_stays_one_line() -> None:
    try:
        raise ValueError(FORGE)
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", (FORGE,), sys.exc_info())
    record.request_id = "-"
    line = EscapingFormatter(LOG_FORMAT).format(record)
    assert "\n" not in line and "\x1b" not in line and "Traceback" in line
