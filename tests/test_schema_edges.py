"""Issue 24 D4: a schema with no finite instance is a 400 before any token; a constrained answer
that stops without being an instance of its schema ends with an error, never ``stop``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_server.engine.constraints import BOUNDED_OBJECT_SCHEMA
from llm_server.serving.schema_check import check_instance, uninhabited_reason
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server

HEADERS = {"X-API-Key": API_KEY}
MODEL = "scripted-model"

#: The three schemas of the issue, and more with no finite instance.
IMPOSSIBLE = [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]},
    {"$ref": "#"},
    {"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"},
    {"type": "object", "properties": {"a": False}, "required": ["a"]},
    {"type": "object", "required": ["b"], "additionalProperties": False},
    {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
    {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"$ref": "#/properties/a"}]}},
     "required": ["a"]},
]
#: Recursive or unusual, yet with finite instances.
POSSIBLE = [
    {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
     "required": ["children"]},  # [] ends it
    {"type": "object", "properties": {"next": {"$ref": "#"}}},  # optional: {} ends it
    {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["a"]},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}},
     "$ref": "#/$defs/node"},
    {"type": "string", "minLength": 1},
    BOUNDED_OBJECT_SCHEMA,
    {},
]


@pytest.mark.parametrize("schema", IMPOSSIBLE)
def test_schemas_with_no_finite_instance_are_found(schema: Any) -> None:
    assert uninhabited_reason(schema) is not None


@pytest.mark.parametrize("schema", POSSIBLE)
def test_schemas_with_finite_instances_pass(schema: Any) -> None:
    assert uninhabited_reason(schema) is None


def test_the_final_check_accepts_instances_and_refuses_the_rest() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    check_instance('{"a": 1}', schema)
    for text in ('{"', '{"a": ', "", '{"a": "x"}'):
        with pytest.raises(Exception, match="structured output"):
            check_instance(text, schema)


@pytest.fixture(scope="module")
def engine(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, reply='{"')


@pytest.fixture(scope="module")
def url(engine: ScriptedEngine) -> Iterator[str]:
    with live_server(build_app(engine)) as base:
        yield base


def json_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("schema", IMPOSSIBLE[:3])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/chat/blocking"])
def test_an_impossible_schema_is_a_400_before_any_token(url: str, engine: ScriptedEngine, schema: Any,
                                                         path: str) -> None:
    before = len(engine.requests)
    body: dict[str, Any] = {"model": MODEL, "response_format": json_schema(schema)}
    body.update({"prompt": "hi"} if path != "/v1/chat/completions" else
                {"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(f"{url}{path}", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_schema" and "finite" in error["message"], error
    assert len(engine.requests) == before  # nothing was generated
    assert httpx.get(f"{url}/health").status_code == 200


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_a_constrained_answer_that_is_no_instance_is_an_error_not_stop(url: str) -> None:
    """The scripted engine ignores the grammar and stops after ``{"``: what a failed matcher does."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": json_schema(SCHEMA)}
    blocking = httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert blocking.status_code == 500, blocking.text
    assert "structured output" in blocking.json()["error"]["message"]

    streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS, timeout=60)
    events = [line.removeprefix("data: ") for line in streamed.text.split("\n") if line.startswith("data: ")]
    assert '"finish_reason":"stop"' not in streamed.text
    assert "structured output" in json.loads(events[-1])["error"]["message"], events

    spec = httpx.post(f"{url}/chat/stream", json={"prompt": "hi", "response_format": json_schema(SCHEMA)},
                      headers=HEADERS, timeout=60)
    assert "[[ERROR]]" in spec.text and "[[END]]" not in spec.text, spec.text
    assert httpx.get(f"{url}/health").status_code == 200
