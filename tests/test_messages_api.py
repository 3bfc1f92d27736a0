"""Anthropic's Messages API through the official ``anthropic`` client: a scripted engine for what the
server does (messages the SDK's own types validate, named SSE events in order, tools, count_tokens,
errors in Anthropic's shape), the embedded SmolLM2 for real round trips (integration)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message

from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                            "required": ["city"], "additionalProperties": False}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}


def client(url: str, key: str = API_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


@pytest.fixture
def scripted(tokenizer: Any) -> Iterator[Any]:
    """scripted(reply) -> (client, engine, url) around a ScriptedEngine answering ``reply``."""
    with ExitStack() as stack:
        def start(reply: Any = "Hello there friend.") -> tuple[anthropic.Anthropic, ScriptedEngine, str]:
            engine = ScriptedEngine(tokenizer, reply=reply, model_id="m")
            url = stack.enter_context(live_server(build_app(engine)))
            return client(url), engine, url
        yield start


def _prompt(engine: ScriptedEngine) -> str:
    return str(engine.tokenizer.decode(engine.requests[-1].prompt_ids))


def test_plain_message_validates_against_the_sdk_type(scripted: Any) -> None:
    api, engine, url = scripted()
    result = api.messages.create(model="m", max_tokens=50, system="Be brief, kestrel.",
                                 messages=[{"role": "user", "content": "Say hello"}], stop_sequences=["zzz"])
    assert result.content[0].type == "text" and result.content[0].text == "Hello there friend."
    assert result.stop_reason == "end_turn" and result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert "Be brief, kestrel." in _prompt(engine) and engine.requests[-1].params.stop == ("zzz",)
    raw = httpx.post(f"{url}/v1/messages", headers=HEADERS, json={
        "model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    Message.model_validate(raw.json())  # the SDK's own type, strictly
    from tests.openai_harness import metric_value

    assert metric_value(url, "llm_server_requests_total", {"endpoint": "/v1/messages", "status": "200"}) == 2


def test_max_tokens_stop_reason(scripted: Any) -> None:
    api, _, _ = scripted("one two three four five six seven eight nine ten eleven twelve")
    result = api.messages.create(model="m", max_tokens=3, messages=ASK)  # type: ignore[arg-type]
    assert result.stop_reason == "max_tokens" and result.usage.output_tokens == 3


def test_streamed_named_events_in_order(scripted: Any) -> None:
    _, _, url = scripted()
    with httpx.stream("POST", f"{url}/v1/messages", headers=HEADERS,
                      json={"model": "m", "max_tokens": 50, "messages": ASK, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    body = [n for n in names if n != "content_block_delta"]
    assert body == ["message_start", "ping", "content_block_start", "content_block_stop", "message_delta",
                    "message_stop"]
    assert names.count("content_block_delta") >= 2


def test_sdk_stream_helper(scripted: Any) -> None:
    api, _, _ = scripted()
    with api.messages.stream(model="m", max_tokens=50, messages=ASK) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there friend." and final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_tool_use_out_and_tool_result_in(scripted: Any) -> None:
    api, engine, _ = scripted(CALL_TEXT)
    first = api.messages.create(model="m", max_tokens=60, messages=ASK, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}  # type: ignore[union-attr]
    engine.reply = "It is sunny."
    history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,  # type: ignore[union-attr]
                                             "content": "Sunny, 24 C"}]}]
    second = api.messages.create(model="m", max_tokens=60, messages=history, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert second.stop_reason == "end_turn" and second.content[0].text == "It is sunny."  # type: ignore[union-attr]
    prompt = _prompt(engine)
    assert "Sunny, 24 C" in prompt and '"city": "Paris"' in prompt


def test_streamed_tool_use(scripted: Any) -> None:
    api, _, _ = scripted(CALL_TEXT)
    with api.messages.stream(model="m", max_tokens=60, messages=ASK, tools=[WEATHER]) as stream:  # type: ignore[arg-type,list-item]
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert "input_json" in kinds and "text" not in kinds


def test_tool_choice_any_and_named_reach_the_grammar(scripted: Any) -> None:
    api, engine, _ = scripted(CALL_TEXT)
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        result = api.messages.create(model="m", max_tokens=60, messages=ASK, tools=[WEATHER],  # type: ignore[arg-type,list-item]
                                     tool_choice=choice)  # type: ignore[arg-type]
        assert result.stop_reason == "tool_use" and engine.requests[-1].params.constraint is not None


def test_output_config_format_reaches_the_grammar(scripted: Any) -> None:
    api, engine, _ = scripted('{"city": "Paris"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    result = api.messages.create(model="m", max_tokens=30, messages=ASK,  # type: ignore[arg-type]
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(result.content[0].text) == {"city": "Paris"}  # type: ignore[union-attr]
    assert engine.requests[-1].params.constraint is not None


def test_count_tokens_matches_the_prompt(scripted: Any) -> None:
    api, engine, _ = scripted()
    counted = api.messages.count_tokens(model="m", messages=ASK, system="Be brief.")  # type: ignore[arg-type]
    result = api.messages.create(model="m", max_tokens=10, messages=ASK, system="Be brief.")  # type: ignore[arg-type]
    assert counted.input_tokens == result.usage.input_tokens == len(engine.requests[-1].prompt_ids)
    with_tools = api.messages.count_tokens(model="m", messages=ASK, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert with_tools.input_tokens > counted.input_tokens


def test_top_k_reaches_the_sampler(scripted: Any) -> None:
    api, engine, _ = scripted()
    api.messages.create(model="m", max_tokens=10, messages=ASK, extra_body={"top_k": 5, "temperature": 1.0})
    assert engine.requests[-1].params.top_k == 5
    api.messages.create(model="m", max_tokens=10, messages=ASK, extra_body={"top_k": 0, "temperature": 1.0})
    assert engine.requests[-1].params.top_k == 0


BAD_INPUTS = [
    ({"model": "m", "messages": ASK}, "max_tokens"),
    ({"model": "m", "max_tokens": "ten", "messages": ASK}, "max_tokens"),
    ({"model": "m", "max_tokens": 10, "messages": "hi"}, "messages"),
    ({"model": "m", "max_tokens": 10, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "top_k": -1}, "top_k"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}},
     "thinking"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "w"}]},
     "tools.0.type"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "temperature": 1.5}, "temperature"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "frobnicate": 1}, "frobnicate"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "output_config": {"effort": "high"}}, "output_config.effort"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "output_config": {"format": {"type": "xml"}}},
     "output_config.format"),
    ({"model": "m", "max_tokens": 10, "messages": ASK, "tool_choice": {"type": "magic"}}, "tool_choice.type"),
    ({"model": "m", "max_tokens": 5000, "messages": ASK}, "max_tokens"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),
]


def _anthropic_error(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize("body, param", BAD_INPUTS, ids=[p for _, p in BAD_INPUTS])
def test_bad_input_is_a_400_in_anthropic_shape(scripted: Any, body: dict[str, Any], param: str) -> None:
    _, _, url = scripted()
    reply = httpx.post(f"{url}/v1/messages", json=body, headers=HEADERS)
    assert reply.status_code == 400, reply.text
    error = _anthropic_error(reply)
    assert error["type"] == "invalid_request_error" and param in error["message"]
    ok = httpx.post(f"{url}/v1/messages", json={"model": "m", "max_tokens": 5, "messages": ASK}, headers=HEADERS)
    assert ok.status_code == 200


def test_auth_not_found_and_bad_json_in_anthropic_shape(scripted: Any) -> None:
    api, _, url = scripted()
    body = {"model": "m", "max_tokens": 5, "messages": ASK}
    missing = httpx.post(f"{url}/v1/messages", json=body)
    assert missing.status_code == 401 and _anthropic_error(missing)["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        client(url, "wrong").messages.create(**body)  # type: ignore[arg-type]
    bearer = httpx.post(f"{url}/v1/messages", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert bearer.status_code == 200
    with pytest.raises(anthropic.NotFoundError):
        api.messages.create(**{**body, "model": "claude-nope"})  # type: ignore[arg-type]
    not_json = httpx.post(f"{url}/v1/messages", content=b"{nope",
                          headers={**HEADERS, "content-type": "application/json"})
    assert not_json.status_code == 400 and _anthropic_error(not_json)["type"] == "invalid_request_error"
    counted = httpx.post(f"{url}/v1/messages/count_tokens", json={"model": "m"}, headers=HEADERS)
    assert counted.status_code == 400 and "messages" in _anthropic_error(counted)["message"]


def test_generation_failure_and_overload_in_anthropic_shape(scripted: Any) -> None:
    from llm_server.engine.types import EngineError

    _, engine, url = scripted()
    body = {"model": "m", "max_tokens": 5, "messages": ASK}
    engine.fail_with = EngineError("boom")
    whole = httpx.post(f"{url}/v1/messages", json=body, headers=HEADERS)
    assert whole.status_code == 500 and _anthropic_error(whole)["type"] == "api_error"
    with httpx.stream("POST", f"{url}/v1/messages", headers=HEADERS, json={**body, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-2] == "event: error" and "boom" in json.loads(lines[-1].removeprefix("data: "))["error"]["message"]
    engine.fail_with = None
    engine.max_waiting = 0  # every submit is refused: a full queue
    full = httpx.post(f"{url}/v1/messages", json=body, headers=HEADERS)
    assert full.status_code == 503 and _anthropic_error(full)["type"] == "overloaded_error"
    assert full.headers["retry-after"]


def test_abandoned_streams_and_requests_stop_generating(tokenizer: Any) -> None:
    """Both new protocols ride the shared turn: a client that leaves cancels its generation."""
    from tests.openai_harness import wait_until

    engine = ScriptedEngine(tokenizer, reply=" ".join(["word"] * 1000), delay_s=0.02, model_id="m")
    with live_server(build_app(engine)) as url:
        requests = [("/v1/messages", {"model": "m", "max_tokens": 1000, "messages": ASK}),
                    ("/v1/responses", {"model": "m", "max_output_tokens": 1000, "input": "hi"})]
        for path, body in requests:
            with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, headers=HEADERS) as reply:
                lines = reply.iter_lines()
                for line in lines:
                    if "delta" in line:
                        break
                assert engine.stats().running == 1
            assert wait_until(lambda: engine.stats().running == 0, timeout_s=10)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}{path}", json=body, headers=HEADERS, timeout=0.5)
            assert wait_until(lambda: engine.stats().running == 0, timeout_s=10)
