"""The Responses and Messages APIs on the real embedded SmolLM2, through the real ``openai`` and
``anthropic`` clients: plain, streamed, a function tool round trip, ``text.format`` json_schema,
``previous_response_id``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.openai_harness import API_KEY, build_app, live_server

pytestmark = pytest.mark.integration

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}
ANTHROPIC_WEATHER = {"name": WEATHER["name"], "description": WEATHER["description"],
                     "input_schema": WEATHER["parameters"]}
ASK = "What is the weather in Paris?"
GREEDY = {"temperature": 0}  # the anthropic SDK no longer has the argument; the API still takes it


@pytest.fixture(scope="module")
def embedded_url(embedded: tuple[Any, Any]) -> Iterator[str]:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    tokenizer, model = embedded
    engine = BatchEngine(tokenizer, model, "m", EngineConfig(max_running=4, max_total_tokens=8192, seed=0))
    with live_server(build_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def oa(embedded_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embedded_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def an(embedded_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=embedded_url, api_key=API_KEY, max_retries=0)


def test_responses_plain_and_streamed(oa: openai.OpenAI) -> None:
    result = oa.responses.create(model="m", input="Name a color.", max_output_tokens=20, temperature=0)
    assert result.output_text.strip() and result.usage is not None and result.usage.output_tokens > 0
    streamed = list(oa.responses.create(model="m", input="Name a color.", max_output_tokens=20, temperature=0,
                                        stream=True))
    final = streamed[-1]
    assert final.type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    assert text == final.response.output_text == result.output_text  # greedy: the same answer


def test_responses_function_tool_round_trip(oa: openai.OpenAI) -> None:
    first = oa.responses.create(model="m", input=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                max_output_tokens=60, temperature=0)
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
    final = oa.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice="none", max_output_tokens=40, temperature=0,
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": "Sunny and 24 degrees Celsius"}])
    assert final.output_text and "<tool_call>" not in final.output_text
    assert not [item for item in final.output if item.type == "function_call"]


def test_responses_json_schema(oa: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
              "required": ["city"], "additionalProperties": False}
    result = oa.responses.create(model="m", input="Name a city in France as JSON.", max_output_tokens=60,
                                 text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                  "strict": True}})
    assert isinstance(json.loads(result.output_text)["city"], str)


def test_responses_previous_response_id(oa: openai.OpenAI) -> None:
    first = oa.responses.create(model="m", input="My name is Zorblax. Say hi.", max_output_tokens=20, temperature=0)
    second = oa.responses.create(model="m", input="What is my name?", previous_response_id=first.id,
                                 max_output_tokens=20, temperature=0)
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # history included
    assert oa.responses.retrieve(second.id).output_text == second.output_text


def test_messages_plain_and_streamed(an: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "Name a color."}]
    result = an.messages.create(model="m", max_tokens=20, messages=messages, extra_body=GREEDY)
    assert result.content and result.content[0].text.strip()  # type: ignore[union-attr]
    with an.messages.stream(model="m", max_tokens=20, messages=messages, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == result.content[0].text and final.stop_reason in ("end_turn", "max_tokens")  # type: ignore[union-attr]


def test_messages_tool_round_trip(an: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": ASK}]
    first = an.messages.create(model="m", max_tokens=60, messages=messages, tools=[ANTHROPIC_WEATHER],  # type: ignore[list-item]
                               tool_choice={"type": "any"}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    history = [*messages, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,  # type: ignore[union-attr]
                                             "content": "Sunny and 24 degrees Celsius"}]}]
    final = an.messages.create(model="m", max_tokens=40, messages=history, tools=[ANTHROPIC_WEATHER],  # type: ignore[list-item]
                               tool_choice={"type": "none"}, extra_body=GREEDY)
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].type == "text"
    assert "<tool_call>" not in final.content[0].text  # type: ignore[union-attr]


def test_messages_output_config_json_schema(an: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
              "required": ["city"], "additionalProperties": False}
    result = an.messages.create(model="m", max_tokens=60, messages=[{"role": "user", "content": "A French city?"}],
                                output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(result.content[0].text)["city"], str)  # type: ignore[union-attr]
