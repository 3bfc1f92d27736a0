"""Several choices per OpenAI request on a real engine (tiny seeded model), through the official client.

- streamed ``n``: every choice's chunks carry its index, each choice ends with its own finish chunk
  and the text the same seeded request gives whole; the usage chunk counts every choice;
- ``n`` shares one prefill: the other choices' prompts come from the prefix cache (the engine's
  counters), and each choice counts against admission (a full queue refuses the request, 503);
- ``best_of`` returns the ``n`` likeliest of its candidates (cumulative log-probability), counts
  them all in usage, and refuses what OpenAI refuses (400 naming ``best_of``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from tests.openai_harness import API_KEY, build_app, live_server, metric_value

MODEL = "tiny"
LONG_PROMPT = "The notes of the day. " + " ".join(f"item{i} goes to shelf{i % 7}." for i in range(60))


@pytest.fixture(scope="module")
def url(tokenizer: Any, tiny_model: Any) -> Iterator[str]:
    engine = BatchEngine(tokenizer, tiny_model, MODEL, EngineConfig(max_running=4, max_total_tokens=8192))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]
        yield base


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def _streamed_texts(chunks: list[Any], chat: bool) -> tuple[dict[int, str], dict[int, list[str]]]:
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            part = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + part
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, finishes


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_n_gives_each_choice_its_index_text_and_finish(url: str, chat: bool) -> None:
    client = api(url)
    fields: dict[str, Any] = {"model": MODEL, "n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 10}
    if chat:
        create: Any = client.chat.completions.create
        fields["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        create = client.completions.create
        fields["prompt"] = "Hi"
    whole = create(**fields)
    chunks = list(create(**fields, stream=True, stream_options={"include_usage": True}))
    texts, finishes = _streamed_texts(chunks, chat)
    assert sorted(texts) == [0, 1, 2]
    expected = [c.message.content if chat else c.text for c in whole.choices]
    assert [texts[i] for i in range(3)] == expected  # seeded: the same texts as answered whole
    assert len(set(expected)) == 3
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 30 == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_share_one_prefill(url: str) -> None:
    hits_before = metric_value(url, "llm_server_prefix_cache_hits_total")
    queries_before = metric_value(url, "llm_server_prefix_cache_queries_total")
    reply = api(url).completions.create(model=MODEL, prompt=LONG_PROMPT, n=4, max_tokens=4, temperature=0)
    prompt = reply.usage.prompt_tokens
    assert prompt > 200 and len(reply.choices) == 4
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # the first choice computed the prompt
    hits = metric_value(url, "llm_server_prefix_cache_hits_total") - hits_before
    queries = metric_value(url, "llm_server_prefix_cache_queries_total") - queries_before
    assert queries == 4 * prompt
    assert hits >= 3 * (prompt // 16 * 16 - 16)  # the other three started from its KV (whole blocks)
    assert len({c.text for c in reply.choices}) == 1  # greedy: the same answer four times


def test_each_choice_counts_against_admission(tokenizer: Any, tiny_model: Any) -> None:
    engine = BatchEngine(tokenizer, tiny_model, MODEL, EngineConfig(max_running=1, max_waiting=2,
                                                                    max_total_tokens=4096))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]
        with pytest.raises(openai.InternalServerError) as caught:  # 503: the queue holds two, four asked
            api(base).completions.create(model=MODEL, prompt="Hi", n=4, max_tokens=300, temperature=0)
        assert caught.value.status_code == 503
        assert api(base).completions.create(model=MODEL, prompt="Hi", n=2, max_tokens=3).choices[1].index == 1


def test_best_of_returns_the_likeliest_candidates(url: str) -> None:
    fields: dict[str, Any] = {"model": MODEL, "prompt": "Hi", "seed": 7, "temperature": 1.2, "max_tokens": 8}
    candidates = api(url).completions.create(**fields, n=4, logprobs=0)
    scored = sorted(candidates.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    best = api(url).completions.create(**fields, n=2, best_of=4)
    assert [c.text for c in best.choices] == [c.text for c in scored[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)  # not asked for
    assert best.usage.completion_tokens == candidates.usage.completion_tokens  # every candidate counted
    with_logprobs = api(url).completions.create(**fields, best_of=4, logprobs=2)
    assert len(with_logprobs.choices) == 1 and with_logprobs.choices[0].text == scored[0].text
    assert len(with_logprobs.choices[0].logprobs.top_logprobs[0]) == 2


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("completions", {"best_of": 2, "n": 3}),
        ("completions", {"best_of": 3, "stream": True}),
        ("completions", {"best_of": 17}),
        ("completions", {"best_of": 0}),
        ("chat/completions", {"best_of": 2}),
    ],
)
def test_bad_best_of_is_400_naming_it(url: str, path: str, fields: dict[str, Any]) -> None:
    body: dict[str, Any] = {"prompt": "Hi"} if path == "completions" else {"messages": [{"role": "user",
                                                                                         "content": "Hi"}]}
    response = httpx.post(f"{url}/v1/{path}", json={"model": MODEL, "max_tokens": 4, **body, **fields},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "best_of" and "best_of" in error["message"]
    assert api(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"
