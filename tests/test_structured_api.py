"""``response_format`` and ``logprobs`` through the official ``openai`` client, on the embedded
SmolLM2 behind the batching engine and a real uvicorn server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.openai_harness import API_KEY, build_app, live_server, metric_value

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"

COUNTRIES = [
    "France", "Germany", "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "India", "Kenya",
    "Mexico", "Norway", "Peru", "Poland", "Chile", "Greece", "Sweden", "Turkey", "Vietnam", "Portugal",
]


class CountryFacts(BaseModel):
    country: str = Field(max_length=30)
    capital: str = Field(max_length=30)
    continent: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=2000)


STRICT_SCHEMA = {**CountryFacts.model_json_schema(), "additionalProperties": False}


@pytest.fixture(scope="module")
def url(embedded: tuple[Any, Any]) -> Iterator[str]:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    tokenizer, model = embedded
    engine = BatchEngine(tokenizer, model, MODEL, EngineConfig(max_running=10, max_total_tokens=16384, seed=0))
    with live_server(build_app(engine)) as base:
        yield base


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def ask(country: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give the capital, continent and population of {country}."}]


def test_parse_with_a_pydantic_model_returns_parsed_objects(client: openai.OpenAI) -> None:
    def one(country: str) -> Any:
        return client.chat.completions.parse(model=MODEL, messages=ask(country), response_format=CountryFacts,
                                             max_tokens=60, temperature=0)

    with ThreadPoolExecutor(len(COUNTRIES)) as pool:  # batched together by the engine
        completions = list(pool.map(one, COUNTRIES))
    for completion in completions:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, CountryFacts)
        assert 0 <= choice.message.parsed.population_millions <= 2000


def test_json_object_mode_returns_valid_json(client: openai.OpenAI) -> None:
    def one(country: str) -> Any:
        messages = [{"role": "user", "content": f"Describe {country} as a small JSON object."}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                              response_format={"type": "json_object"})

    with ThreadPoolExecutor(8) as pool:
        completions = list(pool.map(one, COUNTRIES[:8]))
    for completion in completions:  # bounded objects: a 135M model closes every one of them
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content or ""), dict)


def test_structured_output_streams(client: openai.OpenAI, url: str) -> None:
    schema = STRICT_SCHEMA
    forced_before = metric_value(url, "llm_server_spec_decode_num_forced_tokens_total")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ask("Japan"), max_tokens=60, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "facts", "schema": schema, "strict": True}},
    ))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    CountryFacts.model_validate_json("".join(pieces))
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the schema's keys and punctuation were drafted and verified in steps with other tokens
    assert metric_value(url, "llm_server_spec_decode_num_forced_tokens_total") > forced_before


def test_completions_endpoint_accepts_response_format(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="Facts about Peru in JSON:", max_tokens=60, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "facts", "schema": STRICT_SCHEMA}}},
    )
    CountryFacts.model_validate_json(completion.choices[0].text)


@pytest.mark.parametrize("response_format, param, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
     "response_format.json_schema.schema", "foo"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format.json_schema.schema", "regex"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema", "schema"),
    ({"type": "xml"}, "response_format.type", "xml"),
])
def test_bad_response_formats_are_400_and_the_server_stays_healthy(
        client: openai.OpenAI, url: str, response_format: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ask("Chile"), max_tokens=5,
                                       response_format=response_format)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param and words in error["message"]
    assert httpx.get(f"{url}/health").status_code == 200
    after = client.chat.completions.create(model=MODEL, messages=ask("Chile"), max_tokens=3, temperature=0)
    assert after.choices[0].message.content


def test_chat_logprobs_blocking_and_streamed(client: openai.OpenAI) -> None:
    # logprobs are the model's raw distribution: without the configured repetition penalty (1.1), which
    # re-ranks tokens, greedy decoding picks the likeliest of them
    raw = {"repetition_penalty": 1.0}
    blocking = client.chat.completions.create(model=MODEL, messages=ask("Peru"), max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body=raw)
    content = blocking.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == blocking.choices[0].message.content
    assert len(content) == blocking.usage.completion_tokens  # type: ignore[union-attr]
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy picks the likeliest
    streamed = list(client.chat.completions.create(model=MODEL, messages=ask("Peru"), max_tokens=8,
                                                   temperature=0, logprobs=True, stream=True, extra_body=raw))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in tokens] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in tokens)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                           temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and "".join(logprobs.tokens or []) == completion.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in (logprobs.tokens or [])[:i]) for i in range(4)]
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_logprobs_requests_are_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ask("Peru"), max_tokens=3, extra_body=extra)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param
