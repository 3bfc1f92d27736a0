"""Prefix caching as a client sees it: a conversation's next turn reports its cached prompt tokens in
OpenAI's ``usage.prompt_tokens_details.cached_tokens`` (streamed and not), ``/metrics`` counts the
prefix-cache queries and hits in tokens, and ``/health`` names the runner serving the model."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import OpenAI

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from tests.openai_harness import API_KEY, build_app, live_server, metric_value

MODEL = "tiny-llama"
SYSTEM = "You answer questions about the notes below. " + " ".join(f"note{i} is about topic{i}." for i in range(40))


@pytest.fixture
def url(tokenizer: Any, tiny_model: Any) -> Any:
    engine = BatchEngine(tokenizer, tiny_model, MODEL, EngineConfig(max_running=4, max_total_tokens=8192))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]  # a real engine, not the fake
        yield base


def _ask(api: OpenAI, messages: list[dict[str, str]], stream: bool) -> tuple[str, Any]:
    if not stream:
        reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        return reply.choices[0].message.content or "", reply.usage
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True])
def test_the_next_turn_reports_cached_prompt_tokens(url: str, stream: bool) -> None:
    api = OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    queries_before = metric_value(url, "llm_server_prefix_cache_queries_total")
    hits_before = metric_value(url, "llm_server_prefix_cache_hits_total")
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is note3 about?"}]
    answer, first = _ask(api, turn1, stream)
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And note7?"}]
    _, second = _ask(api, turn2, stream)
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert cached >= first.prompt_tokens // 16 * 16 - 16  # whole 16-token blocks of the first turn's prompt
    assert cached < second.prompt_tokens
    hits = metric_value(url, "llm_server_prefix_cache_hits_total") - hits_before
    queries = metric_value(url, "llm_server_prefix_cache_queries_total") - queries_before
    assert hits == cached and queries == first.prompt_tokens + second.prompt_tokens


def test_health_names_the_runner(url: str) -> None:
    body = httpx.get(f"{url}/health").json()
    assert body["runner"] == "LlamaRunner" and body["runner_reason"]
