"""Tool calling through the official ``openai`` client: a scripted engine for what the server
does with the model's text (calls out, text stays text, history in), the embedded SmolLM2 for
grammar-constrained calls and a full round trip."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS: list[Any] = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def scripted(tokenizer: Any) -> Iterator[Any]:
    """scripted(reply) -> (client, engine) around a ScriptedEngine answering ``reply``."""
    with ExitStack() as stack:
        def start(reply: Any) -> tuple[openai.OpenAI, ScriptedEngine]:
            engine = ScriptedEngine(tokenizer, reply=reply, model_id="m")
            return client(stack.enter_context(live_server(build_app(engine)))), engine
        yield start


def test_auto_reply_holding_a_call_comes_back_as_tool_calls(scripted: Any) -> None:
    api, engine = scripted(CALL_TEXT)
    result = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    assert "<tools>" in prompt and '"name": "add"' in prompt  # the tools reached the prompt


def test_auto_text_that_is_not_a_call_stays_text(scripted: Any) -> None:
    for reply in ("It is sunny in Paris.", '{"name": "unknown_tool", "arguments": {}}'):
        api, _ = scripted(reply)
        result = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
        assert result.choices[0].finish_reason == "stop"
        assert result.choices[0].message.content == reply and result.choices[0].message.tool_calls is None


def test_streamed_tool_calls(scripted: Any) -> None:
    api, _ = scripted(CALL_TEXT)
    chunks = list(api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, stream=True))
    calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == []


def test_tool_history_reaches_the_prompt(scripted: Any) -> None:
    api, engine = scripted("It is sunny, 24 C.")
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    result = api.chat.completions.create(model="m", messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert result.choices[0].message.content == "It is sunny, 24 C."
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    assert '<|im_start|>tool\nSunny, 24 C<|im_end|>' in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt


@pytest.mark.parametrize("extra, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "improvement": True}, "tools"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}, *ASK]}, "messages.0.tool_calls"),
])
def test_bad_tool_requests_are_400(scripted: Any, extra: dict[str, Any], param: str) -> None:
    api, engine = scripted("unused")
    body = {"messages": ASK, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="m", messages=body.pop("messages"), extra_body=body)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param
    assert engine.requests == []
    assert api.chat.completions.create(model="m", messages=ASK).choices[0].message.content == "unused"


def test_tools_need_a_chat_template(tokenizer: Any) -> None:
    engine = ScriptedEngine(_TemplateFree(tokenizer), reply="x", model_id="m")
    with live_server(build_app(engine)) as url:
        with pytest.raises(openai.BadRequestError) as caught:
            client(url).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
        assert isinstance(caught.value.body, dict) and "chat template" in caught.value.body["message"]
        assert httpx.get(f"{url}/health").status_code == 200


class _TemplateFree:
    """The embedded tokenizer without its chat template (a base model's)."""

    chat_template = None

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


# --- the embedded model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_url(embedded: tuple[Any, Any]) -> Iterator[str]:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    tokenizer, model = embedded
    engine = BatchEngine(tokenizer, model, "m", EngineConfig(max_running=4, max_total_tokens=8192, seed=0))
    with live_server(build_app(engine)) as url:
        yield url


@pytest.mark.integration
@pytest.mark.parametrize("choice, name", [
    ("required", None),
    ({"type": "function", "function": {"name": "add"}}, "add"),
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
])
def test_required_and_named_calls_always_parse(embedded_url: str, choice: Any, name: str | None) -> None:
    api = client(embedded_url)
    for stream, temperature in ((False, 0.0), (True, 1.0)):  # greedy and sampled
        result = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice,
                                             max_tokens=60, temperature=temperature, seed=3, stream=stream)
        calls = _calls(result, stream)
        assert calls, "no call"
        for call_name, arguments in calls:
            assert call_name == (name or call_name) and call_name in {"add", "get_weather"}
            assert isinstance(json.loads(arguments), dict)


def _calls(result: Any, stream: bool) -> list[tuple[str, str]]:
    if stream:
        chunks = list(result)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        return [(t.function.name, t.function.arguments) for c in chunks if c.choices and c.choices[0].delta.tool_calls
                for t in c.choices[0].delta.tool_calls]
    assert result.choices[0].finish_reason == "tool_calls"
    return [(t.function.name, t.function.arguments) for t in result.choices[0].message.tool_calls or []]


@pytest.mark.integration
def test_tool_call_round_trip(embedded_url: str) -> None:
    """Call, tool result, final answer, on the real model."""
    api = client(embedded_url)
    first = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny and 24 degrees Celsius"}
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True), result]
    final = api.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=40, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content and "<tool_call>" not in final.choices[0].message.content
