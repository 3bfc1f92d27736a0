"""Every error of the OpenAI-compatible API, in OpenAI's shape, as the official client sees it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest

from llm_server.engine.types import EngineError
from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server, wait_until

MODEL = "scripted-model"
USER = [{"role": "user", "content": "Hello there."}]
HEADERS = {"X-API-Key": API_KEY}

Serve = Callable[..., tuple[str, ScriptedEngine]]


@pytest.fixture
def serve(tokenizer: Any) -> Iterator[Serve]:
    with ExitStack() as stack:

        def start(**engine_kwargs: Any) -> tuple[str, ScriptedEngine]:
            engine = ScriptedEngine(tokenizer, **{"reply": "one two three four", **engine_kwargs})
            url = stack.enter_context(live_server(build_app(engine)))
            return url, engine

        yield start


@pytest.fixture(scope="module")
def shared(tokenizer: Any) -> Iterator[tuple[str, ScriptedEngine]]:
    """One server for the stateless refusal cases (each checks the engine got nothing new)."""
    engine = ScriptedEngine(tokenizer, reply="one two three four")
    with live_server(build_app(engine)) as url:
        yield url, engine


def client(url: str, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def assert_openai_error(body: dict[str, Any], *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The body is exactly ``{"error": {message, type, param, code}}``; return the inner dict."""
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS if headers is None else headers)


# --- 401 ------------------------------------------------------------------------------------
def test_missing_and_wrong_key_are_401(serve: Serve) -> None:
    url, engine = serve()
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(url, api_key="not-the-key").chat.completions.create(model=MODEL, messages=USER)
    assert wrong.value.status_code == 401
    missing = post(url, {"model": MODEL, "messages": USER}, headers={})
    assert missing.status_code == 401
    assert_openai_error(missing.json())
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert engine.requests == []


# --- 404 ------------------------------------------------------------------------------------
def test_unknown_model_is_404_model_not_found(serve: Serve) -> None:
    url, engine = serve()
    with pytest.raises(openai.NotFoundError) as err:
        client(url).chat.completions.create(model="gpt-4o", messages=USER)
    assert_openai_error(err.value.response.json(), param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="gpt-4o", prompt="x")
    assert engine.requests == []


# --- 400 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"messages": USER}, "model"),
        ({"model": MODEL, "messages": USER, "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "top_p": "high"}, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": MODEL, "messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]}]}, "messages.0.content"),
    ],
)
def test_validation_errors_are_400_not_422(shared: tuple[str, ScriptedEngine], body: dict[str, Any],
                                           param: str) -> None:
    url, engine = shared
    submitted = len(engine.requests)
    response = post(url, body)
    assert response.status_code == 400
    assert_openai_error(response.json(), param=param)
    assert len(engine.requests) == submitted


@pytest.mark.parametrize("prompt", ["", [""]])
def test_an_empty_completion_prompt_is_400(shared: tuple[str, ScriptedEngine], prompt: Any) -> None:
    url, engine = shared
    submitted = len(engine.requests)
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt}, headers=HEADERS)
    assert response.status_code == 400
    assert_openai_error(response.json(), param="prompt")
    assert len(engine.requests) == submitted


def test_malformed_json_is_400(serve: Serve) -> None:
    url, _ = serve()
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                          headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert_openai_error(response.json())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("totally_unknown_field", 1),
    ],
)
def test_unimplemented_fields_are_refused_by_name(shared: tuple[str, ScriptedEngine], field: str,
                                                  value: Any) -> None:
    url, engine = shared
    submitted = len(engine.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=USER, extra_body={field: value})
    error = assert_openai_error(err.value.response.json(), param=field, code="unsupported_parameter")
    assert field in error["message"]
    assert len(engine.requests) == submitted


def test_harmless_and_default_valued_fields_are_accepted(serve: Serve) -> None:
    url, _ = serve()
    result = client(url).chat.completions.create(
        model=MODEL, messages=USER, n=1, logprobs=False, presence_penalty=0, frequency_penalty=0,
        response_format={"type": "text"}, user="someone", metadata={"k": "v"}, store=False,
    )
    assert result.choices[0].message.content == "one two three four"


def test_completions_refuse_unimplemented_fields(serve: Serve) -> None:
    url, _ = serve()
    for extra in ({"suffix": "end"}, {"best_of": 3, "stream": True}):  # echo + logprobs, best_of: honoured
        with pytest.raises(openai.BadRequestError) as err:
            client(url).completions.create(model=MODEL, prompt="x", extra_body=extra)
        assert_openai_error(err.value.response.json(), param=next(iter(extra)))
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model=MODEL, prompt=["one", "two"])


def test_context_length_exceeded(serve: Serve) -> None:
    url, engine = serve(max_context=64)
    long_text = "word " * 200
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert_openai_error(err.value.response.json(), code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:  # prompt fits, prompt + max_tokens does not
        client(url).chat.completions.create(model=MODEL, messages=USER, max_tokens=60)
    assert_openai_error(err.value.response.json(), param="messages", code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(model=MODEL, prompt=long_text)
    assert_openai_error(err.value.response.json(), param="prompt", code="context_length_exceeded")
    assert engine.requests == []


def test_without_max_tokens_the_default_budget_shrinks_to_fit(serve: Serve) -> None:
    """No max_tokens: the server's default (256) shrinks to the room the prompt leaves, as on the
    spec endpoints; an explicit max_tokens that does not fit is still a 400."""
    url, engine = serve(max_context=96, reply=" ".join(["word"] * 300))
    text = "word " * 40  # fits, but not with the default 256 new tokens
    chat = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.choices[0].message.content
    request = engine.requests[-1]
    assert len(request.prompt_ids) + request.params.max_new_tokens == 96
    completion = client(url).completions.create(model=MODEL, prompt=text)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.choices[0].text
    request = engine.requests[-1]
    assert len(request.prompt_ids) + request.params.max_new_tokens == 96
    submitted = len(engine.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=256)
    assert_openai_error(err.value.response.json(), param="messages", code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                            max_completion_tokens=256)
    assert_openai_error(err.value.response.json(), param="messages", code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(model=MODEL, prompt=text, max_tokens=256)
    assert_openai_error(err.value.response.json(), param="prompt", code="context_length_exceeded")
    assert len(engine.requests) == submitted


# --- 503 ------------------------------------------------------------------------------------
def test_overloaded_is_503_with_retry_after(serve: Serve) -> None:
    url, engine = serve(reply=" ".join(["w"] * 400), delay_s=0.02, max_waiting=1)
    api = client(url)
    stream = api.chat.completions.create(model=MODEL, messages=USER, stream=True, max_tokens=400)
    next(iter(stream))  # the single slot is now taken
    try:
        with pytest.raises(openai.InternalServerError) as err:
            api.chat.completions.create(model=MODEL, messages=USER)
        assert err.value.status_code == 503
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert_openai_error(err.value.response.json())
    finally:
        stream.close()
    assert wait_until(lambda: engine.stats().running == 0)


def test_dead_engine_is_503_with_retry_after(serve: Serve) -> None:
    url, engine = serve()
    engine.kill()
    response = post(url, {"model": MODEL, "messages": USER})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert_openai_error(response.json())


# --- errors after the stream started --------------------------------------------------------
def test_error_mid_stream_arrives_as_a_final_sse_error_event(serve: Serve) -> None:
    url, engine = serve()
    engine.fail_with = EngineError("the GPU caught fire")
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=HEADERS,
                      json={"model": MODEL, "messages": USER, "stream": True}) as resp:
        assert resp.status_code == 200
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert "[DONE]" not in raw
    last = httpx.Response(200, content=events[-1].removeprefix("data: ")).json()
    error = assert_openai_error(last)
    assert "GPU caught fire" in error["message"]

    with pytest.raises(openai.APIError, match="GPU caught fire"):
        for _ in client(url).chat.completions.create(model=MODEL, messages=USER, stream=True):
            pass


def test_error_in_blocking_request_is_500_json(serve: Serve) -> None:
    url, engine = serve()
    engine.fail_with = EngineError("model exploded")
    response = post(url, {"model": MODEL, "messages": USER})
    assert response.status_code == 500
    assert "model exploded" in assert_openai_error(response.json())["message"]
