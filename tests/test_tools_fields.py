"""How many calls a reply may hold, and the legacy ``functions`` / ``function_call`` fields.

A named ``tool_choice`` gives exactly one call and ``parallel_tool_calls: false`` at most one
(the grammar and the parser both hold it); legacy ``functions`` map onto tools and the answer
comes back as ``message.function_call`` (``delta.function_call`` when streamed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.test_tools_api import ASK, CALL_TEXT, TOOLS, WEATHER, client, embedded_url, scripted  # noqa: F401

THREE_CALLS = "\n".join([CALL_TEXT, CALL_TEXT.replace("Paris", "Rome"), CALL_TEXT.replace("Paris", "Oslo")])
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_parallel_false_and_named_choice_keep_one_call(scripted: Any) -> None:  # noqa: F811
    api, _ = scripted(THREE_CALLS)
    free = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    assert len(free.choices[0].message.tool_calls or []) == 3
    single = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    calls = single.choices[0].message.tool_calls or []
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    named = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=NAMED)  # type: ignore[arg-type]
    assert len(named.choices[0].message.tool_calls or []) == 1


def test_legacy_functions_answer_with_function_call(scripted: Any) -> None:  # noqa: F811
    api, engine = scripted(CALL_TEXT)
    legacy = {"functions": [WEATHER["function"]]}
    result = api.chat.completions.create(model="m", messages=ASK, extra_body=legacy)
    choice = result.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call is not None and choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    assert "<tools>" in engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    chunks = list(api.chat.completions.create(model="m", messages=ASK, stream=True, extra_body=legacy))
    deltas = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert [d.name for d in deltas] == ["get_weather"] and chunks[-1].choices[0].finish_reason == "function_call"
    text_api, _ = scripted("It is sunny.")
    plain = text_api.chat.completions.create(model="m", messages=ASK, extra_body=legacy)
    assert plain.choices[0].message.content == "It is sunny." and plain.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, param", [
    ({"functions": [WEATHER["function"]], "tools": TOOLS}, "functions"),
    ({"functions": [WEATHER["function"]], "function_call": "sometimes"}, "function_call"),
    ({"function_call": {"name": "get_weather"}}, "function_call"),
    ({"functions": [WEATHER["function"]], "function_call": {"name": "nope"}}, "tool_choice"),
])
def test_bad_legacy_function_requests_are_400(scripted: Any, extra: dict[str, Any], param: str) -> None:  # noqa: F811
    api, engine = scripted("unused")
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="m", messages=ASK, extra_body=extra)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param
    assert engine.requests == []
    assert api.chat.completions.create(model="m", messages=ASK).choices[0].message.content == "unused"


@pytest.fixture(scope="module")
def api(embedded_url: str) -> Iterator[openai.OpenAI]:  # noqa: F811
    yield client(embedded_url)


@pytest.mark.integration
def test_named_choice_gives_exactly_one_call_at_temperature_one(api: openai.OpenAI) -> None:
    for seed in range(5):
        result = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=NAMED,  # type: ignore[arg-type]
                                             temperature=1.0, seed=seed, max_tokens=120)
        calls = result.choices[0].message.tool_calls or []
        assert len(calls) == 1 and calls[0].function.name == "get_weather"
        assert result.choices[0].finish_reason == "tool_calls"
    required = api.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=120)
    assert len(required.choices[0].message.tool_calls or []) == 1


@pytest.mark.integration
def test_legacy_function_call_by_name_on_the_embedded_model(api: openai.OpenAI) -> None:
    result = api.chat.completions.create(model="m", messages=ASK, max_tokens=120, temperature=0, extra_body={
        "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}})
    call = result.choices[0].message.function_call
    assert call is not None and call.name == "get_weather" and "city" in json.loads(call.arguments)
    assert result.choices[0].finish_reason == "function_call"
