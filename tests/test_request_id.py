"""Request ids: kept or created, returned in X-Request-Id, present in log lines; no secrets logged."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest

from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server, wait_until

MODEL = "scripted-model"
HEADERS = {"X-API-Key": API_KEY}
SECRET_PROMPT = "my bank password is hunter2-zanzibar"


@pytest.fixture
def server(tokenizer: Any) -> Iterator[tuple[str, ScriptedEngine]]:
    engine = ScriptedEngine(tokenizer, reply="ok then")
    with live_server(build_app(engine)) as url:
        yield url, engine


def chat(url: str, headers: dict[str, str], content: str = "hello", **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)


def test_new_id_on_every_response(server: tuple[str, ScriptedEngine]) -> None:
    url, _ = server
    responses = [
        chat(url, HEADERS),
        chat(url, {}),  # 401
        chat(url, HEADERS, model="nope"),  # 404
        httpx.get(f"{url}/health"),
        httpx.get(f"{url}/metrics"),
        httpx.get(f"{url}/no/such/path"),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_incoming_id_is_kept_and_reaches_the_engine(server: tuple[str, ScriptedEngine]) -> None:
    url, engine = server
    response = chat(url, {**HEADERS, "X-Request-Id": "trace-abc.123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc.123"
    assert engine.requests[-1].request_id.startswith("trace-abc.123")

    streamed = chat(url, {**HEADERS, "X-Request-Id": "trace-stream-1"}, stream=True)
    assert streamed.headers["x-request-id"] == "trace-stream-1"


@pytest.mark.parametrize("bad", ["x" * 200, "has spaces in it", "new\\nline"])
def test_unsafe_incoming_id_is_replaced(server: tuple[str, ScriptedEngine], bad: str) -> None:
    url, _ = server
    response = httpx.get(f"{url}/health", headers={"X-Request-Id": bad})
    assert response.headers["x-request-id"] != bad
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_log_lines_carry_the_request_id_and_no_secrets(
    server: tuple[str, ScriptedEngine], caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = server
    caplog.set_level(logging.DEBUG)
    chat(url, {**HEADERS, "X-Request-Id": "req-logged-1"}, content=SECRET_PROMPT)
    chat(url, {**HEADERS, "X-Request-Id": "req-logged-2"}, content=SECRET_PROMPT, stream=True)
    httpx.get(f"{url}/v1/models?x_api_key={API_KEY}", headers={"X-Request-Id": "req-logged-3"})

    def access_logged(rid: str) -> bool:  # written once the response is fully sent
        return any(r.name == "llm_server.access" and getattr(r, "request_id", None) == rid
                   for r in list(caplog.records))

    for rid in ("req-logged-1", "req-logged-2", "req-logged-3"):
        assert wait_until(partial(access_logged, rid)), rid
    ours = [r for r in caplog.records if r.name.startswith("llm_server")]
    assert any(r.name == "llm_server.api.protocols.openai_routes" and r.request_id == "req-logged-1" for r in ours)

    server_side = [r for r in caplog.records if r.name.startswith(("llm_server", "uvicorn"))]
    every_line = "\n".join(r.getMessage() for r in server_side)
    assert SECRET_PROMPT not in every_line
    assert "zanzibar" not in every_line
    assert API_KEY not in every_line


def test_log_format_renders_request_id() -> None:
    """Every record gets ``request_id`` ("-" outside a request); the server's format shows it."""
    from llm_server.api.plumbing.request_context import LOG_FORMAT, install_log_record_factory

    install_log_record_factory()
    record = logging.getLogRecordFactory()("llm_server.test", logging.INFO, __file__, 1, "hello", None, None)
    assert record.request_id == "-"
    assert logging.Formatter(LOG_FORMAT).format(record).endswith("[-] hello")


def test_a_crash_is_an_openai_shaped_500_with_the_request_id(tokenizer: Any) -> None:
    app = build_app(ScriptedEngine(tokenizer))

    async def boom() -> None:
        raise RuntimeError("internal detail that must not leak")

    app.add_api_route("/boom", boom)
    with live_server(app) as url:
        response = httpx.get(f"{url}/boom", headers={"X-Request-Id": "crash-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "crash-1"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "internal detail" not in response.text
