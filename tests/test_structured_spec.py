"""``response_format`` on the spec's /chat/blocking and /chat/stream, and ``ConversationEngine``'s
``schema``: both hold a tiny random model (which would emit garbage) to a JSON schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.openai_harness import API_KEY, build_app, live_server
from tests.test_engine_batching import build_model

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "blue"]}},
          "required": ["ok", "colour"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


@pytest.fixture(scope="module")
def url(tokenizer: Any, model: Any) -> Iterator[str]:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    engine = BatchEngine(tokenizer, model, "tiny", EngineConfig(max_running=4, max_total_tokens=8192, seed=0))
    with live_server(build_app(engine)) as base:
        yield base


def check(text: str) -> None:
    value = json.loads(text)
    assert isinstance(value["ok"], bool) and value["colour"] in ("red", "blue")


def test_blocking_and_streamed_replies_follow_the_schema(url: str) -> None:
    body = {"prompt": "Answer in JSON.", "max_new_tokens": 30, "response_format": JSON_SCHEMA_FORMAT}
    blocking = httpx.post(f"{url}/chat/blocking", json=body, headers=HEADERS, timeout=60)
    assert blocking.status_code == 200
    check(blocking.json()["reply"])
    streamed = httpx.post(f"{url}/chat/stream", json={**body, "temperature": 1.0}, headers=HEADERS, timeout=60)
    assert streamed.text.endswith("[[END]]")
    check(streamed.text.removesuffix("[[END]]"))


def test_get_takes_response_format_as_json_text(url: str) -> None:
    params = {"prompt": "Answer.", "max_new_tokens": "30", "response_format": json.dumps({"type": "json_object"})}
    response = httpx.get(f"{url}/chat/blocking", params=params, headers=HEADERS, timeout=60)
    assert response.status_code == 200
    assert response.json()["reply"].startswith("{")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": JSON_SCHEMA_FORMAT, "improvement": True}, "response_format"),
])
def test_bad_response_formats_are_400(url: str, extra: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{url}/chat/blocking", json={"prompt": "Hi", "max_new_tokens": 5, **extra},
                          headers=HEADERS, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    after = httpx.post(f"{url}/chat/blocking", json={"prompt": "Hi", "max_new_tokens": 3}, headers=HEADERS, timeout=60)
    assert after.status_code == 200


def test_conversation_engine_schema(tokenizer: Any, model: Any) -> None:
    from llm_server.conversation_engine.conversation_engine import ConversationEngine

    engine = ConversationEngine(tokenizer, model, "You answer in JSON.", schema=SCHEMA, max_new_tokens=30)
    for _ in range(2):  # a fresh grammar state every turn
        check(engine.reply("Answer."))
    assert len(engine.conversation_history) == 4 and set(engine.last_result) == {"reply"}
    with pytest.raises(ValueError, match="improvement"):
        engine.set_improvement(True).reply("Again.")
