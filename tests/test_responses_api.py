"""OpenAI's Responses API through the official ``openai`` client: a scripted engine for what the
server does (objects the SDK's own types validate, events in order, tools, text.format, stored
responses per key, errors), the embedded SmolLM2 for real round trips (integration)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response

from llm_server.api.protocols.responses_store import ResponseStore, owner_of
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
OTHER_KEY = "other-key-456"


def client(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


@pytest.fixture
def scripted(tokenizer: Any) -> Iterator[Any]:
    """scripted(reply) -> (client, engine, url) around a ScriptedEngine answering ``reply``; two keys."""
    with ExitStack() as stack:
        def start(reply: Any = "Hello there friend.") -> tuple[openai.OpenAI, ScriptedEngine, str]:
            engine = ScriptedEngine(tokenizer, reply=reply, model_id="m")
            url = stack.enter_context(live_server(build_app(engine, api_keys=(API_KEY, OTHER_KEY))))
            return client(url), engine, url
        yield start


def _prompt(engine: ScriptedEngine) -> str:
    return str(engine.tokenizer.decode(engine.requests[-1].prompt_ids))


def test_plain_response_validates_against_the_sdk_type(scripted: Any) -> None:
    api, engine, url = scripted()
    result = api.responses.create(model="m", input="Say hello", instructions="Be brief, kestrel.",
                                  max_output_tokens=50, metadata={"k": "v"})
    assert result.output_text == "Hello there friend." and result.status == "completed"
    assert result.usage is not None and result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert result.metadata == {"k": "v"} and result.instructions == "Be brief, kestrel."
    raw = httpx.post(f"{url}/v1/responses", json={"model": "m", "input": "hi"},
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    Response.model_validate(raw)  # the SDK's own type, strictly (not only its lenient construct)
    assert raw["object"] == "response" and raw["output"][0]["content"][0]["type"] == "output_text"
    api.responses.create(model="m", input="x", instructions="Be brief, kestrel.")
    assert "Be brief, kestrel." in _prompt(engine)


def test_streamed_events_in_order_with_sequence_numbers(scripted: Any) -> None:
    api, _, _ = scripted()
    kinds, numbers, text = [], [], ""
    for event in api.responses.create(model="m", input="Say hello", stream=True):
        kinds.append(event.type)
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            assert event.response.output_text == "Hello there friend."
    assert text == "Hello there friend." and numbers == list(range(len(numbers)))
    body = [k for k in kinds if k != "response.output_text.delta"]
    assert body == ["response.created", "response.in_progress", "response.output_item.added",
                    "response.content_part.added", "response.output_text.done", "response.content_part.done",
                    "response.output_item.done", "response.completed"]
    assert kinds.count("response.output_text.delta") >= 2


def test_sdk_stream_helper_gives_the_final_response(scripted: Any) -> None:
    api, _, _ = scripted()
    with api.responses.stream(model="m", input="Say hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello there friend."


def test_function_call_out_and_result_in(scripted: Any) -> None:
    api, engine, _ = scripted(CALL_TEXT)
    first = api.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert first.output_text == "" and '"name": "get_weather"' in _prompt(engine)
    engine.reply = "It is sunny."
    second = api.responses.create(model="m", tools=[WEATHER], input=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C"}])
    assert second.output_text == "It is sunny."
    assert "Sunny, 24 C" in _prompt(engine) and "<tool_call>" in _prompt(engine)


def test_streamed_function_call_events(scripted: Any) -> None:
    api, _, _ = scripted(CALL_TEXT)
    events = list(api.responses.create(model="m", input="Weather?", tools=[WEATHER], stream=True))  # type: ignore[list-item]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds and "response.output_text.delta" not in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_text_format_json_schema_reaches_the_grammar(scripted: Any) -> None:
    api, engine, _ = scripted('{"city": "Paris"}')
    fmt = {"type": "json_schema", "name": "place", "strict": True,
           "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                      "additionalProperties": False}}
    result = api.responses.create(model="m", input="A city?", text={"format": fmt})  # type: ignore[typeddict-item]
    assert json.loads(result.output_text) == {"city": "Paris"}
    assert engine.requests[-1].params.constraint is not None
    assert result.text is not None and result.text.format.type == "json_schema"


def test_max_output_tokens_makes_an_incomplete_response(scripted: Any) -> None:
    api, _, _ = scripted("one two three four five six seven eight nine ten eleven twelve")
    result = api.responses.create(model="m", input="count", max_output_tokens=3)
    assert result.status == "incomplete" and result.incomplete_details is not None
    assert result.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_continues_and_is_scoped_per_key(scripted: Any) -> None:
    api, engine, url = scripted("The capital is Paris.")
    first = api.responses.create(model="m", input="Capital of France? say zebra")
    engine.reply = "Yes."
    second = api.responses.create(model="m", input="Sure?", previous_response_id=first.id)
    prompt = _prompt(engine)
    assert "say zebra" in prompt and "The capital is Paris." in prompt and second.previous_response_id == first.id
    assert api.responses.retrieve(first.id).output_text == "The capital is Paris."
    by_query = httpx.get(f"{url}/v1/responses/{first.id}", params={"x_api_key": API_KEY})  # GET may name it so
    assert by_query.status_code == 200 and by_query.json()["id"] == first.id
    other = client(url, OTHER_KEY)
    for call in (lambda: other.responses.retrieve(first.id),
                 lambda: other.responses.create(model="m", input="x", previous_response_id=first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    api.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        api.responses.retrieve(first.id)
    assert err.value.body["code"] == "response_not_found"  # type: ignore[index]
    not_stored = api.responses.create(model="m", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(not_stored.id)


def test_streamed_response_is_stored(scripted: Any) -> None:
    api, _, _ = scripted()
    final = [e for e in api.responses.create(model="m", input="hi", stream=True) if e.type == "response.completed"]
    assert api.responses.retrieve(final[0].response.id).output_text == "Hello there friend."


def test_store_is_bounded_lru_and_scoped() -> None:
    store = ResponseStore(max_items=2, max_bytes=10_000)
    alice, bob = owner_of("secret-key-alice"), owner_of("secret-key-bob")
    for n in range(3):
        store.put(alice, {"id": f"r{n}", "output": []}, [{"role": "user", "content": "x"}])
        if n == 1:
            assert store.get(alice, "r0") is not None  # r0 used: r1 is now the least recent
    assert store.get(alice, "r1") is None and store.get(alice, "r0") is not None and len(store) == 2
    assert store.get(bob, "r0") is None and alice != bob and "secret" not in alice
    assert not store.put(alice, {"id": "big", "output": ["y" * 20_000]}, [])
    small = ResponseStore(max_items=100, max_bytes=300)
    for n in range(10):
        small.put(alice, {"id": f"r{n}", "output": ["z" * 50]}, [])
    assert small.bytes_used <= 300 and small.get(alice, "r9") is not None and small.get(alice, "r0") is None


BAD_INPUTS = [
    ({"model": "m", "input": 42}, "input"),
    ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "input": [{"type": "image_generation_call", "id": "x"}]}, "input.0.type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0"),
    ({"model": "m", "input": [{"role": "wizard", "content": "x"}]}, "input.0.role"),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"model": "m", "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools.0.type"),
    ({"model": "m", "input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "input": ""}, "input"),
    ({"input": "x"}, "model"),
    ({"model": "m", "input": "word " * 5000}, "input"),
]


@pytest.mark.parametrize("body, param", BAD_INPUTS, ids=[p for _, p in BAD_INPUTS])
def test_bad_input_is_a_400_naming_the_parameter(scripted: Any, body: dict[str, Any], param: str) -> None:
    _, _, url = scripted()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{url}/v1/responses", json=body, headers=headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert httpx.post(f"{url}/v1/responses", json={"model": "m", "input": "hi"}, headers=headers).status_code == 200


def test_not_found_and_auth_errors(scripted: Any) -> None:
    api, _, url = scripted()
    for call in (lambda: api.responses.retrieve("resp_nope"), lambda: api.responses.delete("resp_nope"),
                 lambda: api.responses.create(model="m", input="x", previous_response_id="resp_nope"),
                 lambda: api.responses.create(model="other-model", input="x")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert httpx.post(f"{url}/v1/responses", json={"model": "m", "input": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").responses.create(model="m", input="x")


def test_generation_failure_whole_and_streamed(scripted: Any) -> None:
    from llm_server.engine.types import EngineError

    api, engine, url = scripted()
    engine.fail_with = EngineError("boom")
    with pytest.raises(openai.InternalServerError):
        api.responses.create(model="m", input="hi")
    events = list(api.responses.create(model="m", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and "boom" in failed.error.message
    engine.fail_with = None
    assert api.responses.create(model="m", input="hi").status == "completed"
