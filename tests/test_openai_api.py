"""The OpenAI-compatible API, driven by the official ``openai`` client over real HTTP.

A real uvicorn serves the real app on loopback; the engine is a ScriptedEngine (known
replies at a known pace), so answers, token counts and cancellation are exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server, wait_until

MODEL = "scripted-model"
REPLY = "The quick brown fox jumps over the lazy dog."
USER = [{"role": "user", "content": "Say something."}]
LONG_REPLY = " ".join(f"w{i}" for i in range(1000))

Serve = Callable[..., tuple[str, ScriptedEngine]]


@pytest.fixture
def serve(tokenizer: Any) -> Iterator[Serve]:
    """serve(**ScriptedEngine kwargs) -> (base_url, engine), torn down after the test."""
    with ExitStack() as stack:

        def start(**engine_kwargs: Any) -> tuple[str, ScriptedEngine]:
            engine = ScriptedEngine(tokenizer, **{"reply": REPLY, **engine_kwargs})
            url = stack.enter_context(live_server(build_app(engine)))
            return url, engine

        yield start


def client(url: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, **kwargs)


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def test_chat_completion_blocking(serve: Serve) -> None:
    url, engine = serve()
    result = client(url).chat.completions.create(model=MODEL, messages=USER)

    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == MODEL
    assert result.created > 0
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(engine.requests[-1].prompt_ids)
    assert result.usage.completion_tokens == len(REPLY.split(" "))
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_chat_completion_streamed_with_usage(serve: Serve) -> None:
    url, engine = serve()
    chunks = list(
        client(url).chat.completions.create(
            model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == REPLY
    assert len(with_choices) > 3  # really streamed, not one blob
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(REPLY.split(" "))
    assert usage_chunk.usage.prompt_tokens == len(engine.requests[-1].prompt_ids)


def test_stream_without_include_usage_has_no_usage_chunk(serve: Serve) -> None:
    url, _ = serve()
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=USER, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_raw_sse_wire_format(serve: Serve) -> None:
    """``data: {json}`` events separated by blank lines, ending with ``data: [DONE]``."""
    url, _ = serve(reply="a b")
    body = {"model": MODEL, "messages": USER, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert raw.endswith("data: [DONE]\n\n")


def test_async_client_blocking_and_streamed(serve: Serve) -> None:
    url, _ = serve()

    async def scenario() -> tuple[str, str]:
        async with aclient(url) as api:
            blocking = await api.chat.completions.create(model=MODEL, messages=USER)
            stream = await api.chat.completions.create(model=MODEL, messages=USER, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return blocking.choices[0].message.content or "", "".join(parts)

    blocking, streamed = asyncio.run(scenario())
    assert blocking == REPLY
    assert streamed == REPLY


def test_sampling_fields_reach_the_engine(serve: Serve) -> None:
    url, engine = serve()
    client(url).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=7, temperature=0.3, top_p=0.8, seed=42, stop=["END", "STOP"]
    )
    params = engine.requests[-1].params
    assert params.max_new_tokens == 7
    assert params.temperature == pytest.approx(0.3)
    assert params.do_sample
    assert params.top_p == pytest.approx(0.8)
    assert params.seed == 42
    assert params.stop == ("END", "STOP")

    client(url).chat.completions.create(model=MODEL, messages=USER, temperature=0, stop="END", n=1)
    params = engine.requests[-1].params
    assert params.greedy
    assert params.stop == ("END",)

    client(url).chat.completions.create(model=MODEL, messages=USER, temperature=1.0, top_p=0)
    assert engine.requests[-1].params.greedy


def test_max_completion_tokens_and_length_finish(serve: Serve) -> None:
    url, engine = serve()
    result = client(url).chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=3)
    assert engine.requests[-1].params.max_new_tokens == 3
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].message.content == "The quick brown"
    assert result.usage is not None and result.usage.completion_tokens == 3


def test_message_roles_and_text_parts_reach_the_prompt(serve: Serve) -> None:
    url, engine = serve()
    client(url).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief, zebra."},
            {"role": "user", "content": "First question, giraffe."},
            {"role": "assistant", "content": "First answer, penguin."},
            {"role": "user", "content": [{"type": "text", "text": "Part one, walrus."},
                                         {"type": "text", "text": "Part two, octopus."}]},
        ],
    )
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    for word in ("zebra", "giraffe", "penguin", "walrus", "octopus"):
        assert word in prompt
    assert prompt.index("zebra") < prompt.index("giraffe") < prompt.index("penguin") < prompt.index("walrus")


def test_plain_request_gets_no_configured_system_prompt(serve: Serve) -> None:
    url, engine = serve()
    client(url).chat.completions.create(model=MODEL, messages=USER)
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    assert "kestrel" not in prompt and "narwhal" not in prompt


def test_role_extension_selects_the_system_prompt(serve: Serve) -> None:
    url, engine = serve()
    client(url).chat.completions.create(model=MODEL, messages=USER, extra_body={"role": "reviser"})
    assert "narwhal" in engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    client(url).chat.completions.create(model=MODEL, messages=USER, extra_body={"role": "assistant"})
    assert "kestrel" in engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=USER, extra_body={"role": "pirate"})
    assert err.value.response.json()["error"]["param"] == "role"


def test_improvement_with_intermediate_steps_streams_every_stage(serve: Serve) -> None:
    url, engine = serve(reply="Fine answer.")
    stream = client(url).chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True},
        extra_body={"improvement": True, "intermediate_steps": True, "role": "assistant"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    headings = ["### Draft answer", "### Review 1", "### Revision 1", "### Review 2", "### Final answer"]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)
    assert len(engine.requests) == 5  # draft, then review + revision twice (a repeated answer needs no judge)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == sum(len(r.prompt_ids) for r in engine.requests)


def test_improvement_without_intermediate_steps_returns_only_the_answer(serve: Serve) -> None:
    url, engine = serve(reply="Fine answer.")
    result = client(url).chat.completions.create(model=MODEL, messages=USER, extra_body={"improvement": True})
    content = result.choices[0].message.content or ""
    assert "###" not in content
    assert content.strip()
    assert len(engine.requests) == 5  # no pass wasted: the eager first pass is the draft


def test_max_tokens_above_the_server_limit_is_400(serve: Serve) -> None:
    url, engine = serve()
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=USER, max_tokens=5000)
    assert err.value.response.json()["error"]["param"] == "max_tokens"
    assert engine.requests == []


def test_text_completions_blocking_and_streamed(serve: Serve) -> None:
    url, engine = serve()
    api = client(url)
    result = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert result.object == "text_completion"
    assert result.choices[0].text == "The quick brown fox"
    assert result.choices[0].finish_reason == "length"
    assert engine.tokenizer.decode(engine.requests[-1].prompt_ids).endswith("Once upon a time")
    assert result.usage is not None and result.usage.completion_tokens == 4

    chunks = list(api.completions.create(model=MODEL, prompt="Once upon a time", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_list_and_retrieve(serve: Serve) -> None:
    url, _ = serve()
    api = client(url)
    assert [m.id for m in api.models.list()] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")


def test_auth_accepts_bearer_and_x_api_key(serve: Serve) -> None:
    url, _ = serve()
    body = {"model": MODEL, "messages": USER}
    bearer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    header = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-API-Key": API_KEY})
    assert bearer.status_code == 200
    assert header.status_code == 200
    assert header.json()["choices"][0]["message"]["content"] == REPLY


def test_abandoned_stream_stops_generating(serve: Serve) -> None:
    """Closing a stream mid-way cancels the generation: the engine's running count drops to 0."""
    url, engine = serve(reply=LONG_REPLY, delay_s=0.02)  # 1000 x 20 ms = 20 s unless cancelled
    stream = client(url).chat.completions.create(model=MODEL, messages=USER, stream=True, max_tokens=1000)
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received == 3:
            break
    assert engine.stats().running == 1
    stream.close()
    assert wait_until(lambda: engine.stats().running == 0, timeout_s=10)


def test_abandoned_blocking_request_stops_generating(serve: Serve) -> None:
    url, engine = serve(reply=LONG_REPLY, delay_s=0.02)
    with pytest.raises(openai.APITimeoutError):
        client(url, timeout=0.5).chat.completions.create(model=MODEL, messages=USER, max_tokens=1000)
    assert wait_until(lambda: engine.stats().running == 0, timeout_s=10)


@pytest.mark.integration
def test_embedded_model_answers_through_the_openai_sdk(embedded: tuple[Any, Any]) -> None:
    """The real SmolLM2 behind the batching engine, streamed and blocking, greedy."""
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    tokenizer, model = embedded
    served = "SmolLM2-135M-Instruct"
    engine = BatchEngine(tokenizer, model, served, EngineConfig(max_running=2, max_total_tokens=4096))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with live_server(build_app(engine)) as url:
        api = client(url)
        chunks = list(api.chat.completions.create(
            model=served, messages=question, stream=True, max_tokens=12, temperature=0,
            stream_options={"include_usage": True},
        ))
        blocking = api.chat.completions.create(model=served, messages=question, max_tokens=12, temperature=0)

    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    streamed = "".join(pieces)
    assert len(pieces) > 1
    assert "Paris" in streamed
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 12
    assert blocking.choices[0].message.content == streamed  # greedy: the same answer either way
