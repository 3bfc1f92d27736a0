"""The spec's HTTP API through a real uvicorn server on loopback, with a scripted engine.

The spec's own examples ("Basic API Usage", "Streaming Responses", "Health Check and
Testing") run verbatim apart from the URL's port and the key; then streaming details,
in-band errors, a live /ping during a long generation, and client disconnects.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from llm_server.conversation_engine.improvement import STAGE_HEADINGS
from llm_server.engine.types import EngineError
from tests.fakes import ScriptedEngine
from tests.spec_harness import API_KEY, LogCapture, error_of, serving, wait_until

REPLY = "REST APIs expose resources over HTTP verbs."
PROMPTS = {"assistant": "You are the test assistant.", "reviser": "You revise drafts.", "pirate": "Talk like a pirate."}
STAGES = ("draft_answer", "suggestions1", "revision1", "comments1", "suggestions2", "revision2", "comments2")
LONG_WORDS = 20000  # x 20 ms per word = 400 s: only a cancellation ends it within a test's timeout
LONG_REPLY = " ".join(["word"] * LONG_WORDS)


def make_settings(**changes: Any) -> ServerSettings:
    return ServerSettings(api_keys=(API_KEY,), system_prompts=PROMPTS, max_new_tokens_limit=LONG_WORDS, **changes)


@pytest.fixture(scope="module")
def engine(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, reply=REPLY, max_context=10 * LONG_WORDS)


@pytest.fixture(scope="module")
def base_url(engine: ScriptedEngine) -> Iterator[str]:
    with serving(create_app(lambda: engine, settings=make_settings())) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(engine: ScriptedEngine) -> None:
    engine.reply = REPLY
    engine.delay_s = 0.0
    engine.fail_with = None


# --- the spec's examples, verbatim ----------------------------------------------------------
def test_spec_basic_api_usage(base_url: str) -> None:
    url = f"{base_url}/chat/blocking"
    headers = {"X-API-Key": API_KEY}
    payload = {
        "prompt": "Explain how REST APIs work",
        "history": [],
        "improvement": False,
        "intermediate_steps": False,
    }

    response = requests.post(url, json=payload, headers=headers)
    result = response.json()
    assert response.status_code == 200
    assert result == {"reply": REPLY}


def test_spec_streaming_responses(base_url: str) -> None:
    url = f"{base_url}/chat/stream"
    headers = {"X-API-Key": API_KEY}
    payload = {
        "prompt": "Write a Python function to calculate fibonacci numbers",
        "improvement": True,
        "intermediate_steps": True,
    }

    response = requests.post(url, json=payload, headers=headers, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    printed: list[str] = []
    chunks: list[str] = []
    for chunk in response.iter_content(chunk_size=None, decode_unicode=True):
        chunks.append(chunk)
        if chunk and chunk != "[[END]]":
            printed.append(chunk)
    assert chunks[-1] == "[[END]]"
    text = "".join(printed)
    positions = [text.index(heading) for heading in STAGE_HEADINGS]
    assert positions == sorted(positions)
    assert text.rstrip().endswith(REPLY)


def test_spec_health_check_and_testing(base_url: str) -> None:
    ping = requests.get(f"{base_url}/ping?x_api_key={API_KEY}")
    assert ping.status_code == 200 and ping.json() == {"status": "ok"}
    blocking = requests.get(f"{base_url}/chat/blocking?prompt=Hello&x_api_key={API_KEY}")
    assert blocking.status_code == 200 and blocking.json() == {"reply": REPLY}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_spec_curl_examples(base_url: str) -> None:
    def curl(path: str) -> str:
        done = subprocess.run(["curl", "-s", "-f", f"{base_url}{path}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert json.loads(curl(f"/ping?x_api_key={API_KEY}")) == {"status": "ok"}
    assert json.loads(curl(f"/chat/blocking?prompt=Hello&x_api_key={API_KEY}")) == {"reply": REPLY}


# --- request fields reach the engine ---------------------------------------------------------
def test_a_model_without_a_chat_template_is_served(tokenizer: Any) -> None:
    """A base model (no chat template) answers on every endpoint, prompted with the Python API's
    plain "Role: text" transcript, instead of refusing every request."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    engine = ScriptedEngine(plain, reply=REPLY)
    headers = {"X-API-Key": API_KEY}
    with serving(create_app(lambda: engine, settings=make_settings())) as url:
        body = {"prompt": "Hi there", "history": [{"role": "user", "content": "Earlier"}]}
        blocking = requests.post(f"{url}/chat/blocking", json=body, headers=headers, timeout=30)
        assert blocking.status_code == 200 and blocking.json() == {"reply": REPLY}
        prompt = plain.decode(engine.requests[-1].prompt_ids, skip_special_tokens=True)
        expected = "System: You are the test assistant.\n\nUser: Earlier\n\nUser: Hi there\n\nAssistant:"
        assert prompt.endswith(expected)
        openai_body = {"model": engine.model_id, "messages": [{"role": "user", "content": "Hi"}]}
        completion = requests.post(f"{url}/v1/chat/completions", json=openai_body, headers=headers, timeout=30)
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["message"]["content"] == REPLY


def test_history_role_and_sampling_reach_the_prompt(base_url: str, engine: ScriptedEngine, tokenizer: Any) -> None:
    payload = {
        "prompt": "And now?",
        "history": [{"role": "user", "content": "My name is Alice"}, {"role": "assistant", "content": "Hi Alice!"}],
        "role": "pirate",
        "max_new_tokens": 7,
        "temperature": 0.2,
        "top_p": 0.5,
    }
    response = requests.post(f"{base_url}/chat/blocking", json=payload, headers={"X-API-Key": API_KEY})
    assert response.status_code == 200
    request = engine.requests[-1]
    prompt = tokenizer.decode(request.prompt_ids)
    order = [prompt.index(s) for s in ("Talk like a pirate.", "My name is Alice", "Hi Alice!", "And now?")]
    assert order == sorted(order)
    assert "You are the test assistant." not in prompt
    assert (request.params.max_new_tokens, request.params.temperature, request.params.top_p) == (7, 0.2, 0.5)
    assert response.json() == {"reply": " ".join(REPLY.split(" ")[:7])}


def test_no_conversation_state_between_requests(base_url: str, engine: ScriptedEngine, tokenizer: Any) -> None:
    headers = {"X-API-Key": API_KEY}
    requests.post(f"{base_url}/chat/blocking", json={"prompt": "remember the word zebra"}, headers=headers)
    requests.post(f"{base_url}/chat/blocking", json={"prompt": "what was the word?"}, headers=headers)
    assert "zebra" not in tokenizer.decode(engine.requests[-1].prompt_ids)


def test_blocking_with_intermediate_steps_returns_the_stages(base_url: str) -> None:
    payload = {"prompt": "Explain", "improvement": True, "intermediate_steps": True}
    body = requests.post(f"{base_url}/chat/blocking", json=payload, headers={"X-API-Key": API_KEY}).json()
    assert set(body) == {"reply", *STAGES}
    assert body["reply"] == body["revision2"] == REPLY
    assert body["draft_answer"] == REPLY


def test_blocking_improvement_without_steps_returns_only_the_reply(base_url: str) -> None:
    payload = {"prompt": "Explain", "improvement": True, "intermediate_steps": False}
    body = requests.post(f"{base_url}/chat/blocking", json=payload, headers={"X-API-Key": API_KEY}).json()
    assert body == {"reply": REPLY}


def test_get_stream_with_query_fields(base_url: str) -> None:
    response = requests.get(
        f"{base_url}/chat/stream",
        params={"prompt": "Hi", "improvement": "false", "max_new_tokens": "3", "x_api_key": API_KEY},
        stream=True,
    )
    chunks = list(response.iter_content(chunk_size=None, decode_unicode=True))
    assert chunks[-1] == "[[END]]"
    assert "".join(chunks[:-1]) == " ".join(REPLY.split(" ")[:3])


def test_get_blocking_with_history_and_role(base_url: str, engine: ScriptedEngine, tokenizer: Any) -> None:
    history = json.dumps([{"role": "user", "content": "I like green"}, {"role": "assistant", "content": "Noted"}])
    response = requests.get(f"{base_url}/chat/blocking", params={
        "prompt": "My favourite colour?", "history": history, "role": "pirate", "x_api_key": API_KEY})
    assert response.json() == {"reply": REPLY}
    prompt = tokenizer.decode(engine.requests[-1].prompt_ids)
    assert "I like green" in prompt and "Talk like a pirate." in prompt


# --- errors ------------------------------------------------------------------------------------
def test_error_after_stream_start_is_reported_in_band(base_url: str, engine: ScriptedEngine) -> None:
    engine.fail_with = EngineError("the GPU caught fire")
    response = requests.post(f"{base_url}/chat/stream", json={"prompt": "Hi"}, headers={"X-API-Key": API_KEY},
                             stream=True)
    assert response.status_code == 200
    chunks = list(response.iter_content(chunk_size=None, decode_unicode=True))
    assert chunks[-1] == "[[ERROR]] the GPU caught fire"
    assert "[[END]]" not in chunks


def test_error_during_blocking_is_a_json_500(base_url: str, engine: ScriptedEngine) -> None:
    engine.fail_with = EngineError("out of memory")
    response = requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi"}, headers={"X-API-Key": API_KEY})
    assert response.status_code == 500
    assert "out of memory" in error_of(response)["message"]
    engine.fail_with = None
    assert requests.get(f"{base_url}/ping", headers={"X-API-Key": API_KEY}).status_code == 200


def test_overloaded_engine_answers_503_with_retry_after(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, max_waiting=0)
    with serving(create_app(lambda: engine, settings=make_settings())) as url:
        for path in ("/chat/blocking", "/chat/stream"):
            response = requests.post(f"{url}{path}", json={"prompt": "Hi"}, headers={"X-API-Key": API_KEY})
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert error_of(response)["code"] == "overloaded"


# --- never blocking, disconnects ---------------------------------------------------------------
def _open_long_stream(base_url: str, engine: ScriptedEngine, **payload: Any) -> requests.Response:
    engine.reply = LONG_REPLY
    engine.delay_s = 0.02
    body = {"prompt": "Tell me everything", "max_new_tokens": LONG_WORDS, **payload}
    response = requests.post(f"{base_url}/chat/stream", json=body, headers={"X-API-Key": API_KEY}, stream=True)
    assert response.status_code == 200
    return response


def test_ping_answers_during_a_long_generation(base_url: str, engine: ScriptedEngine) -> None:
    response = _open_long_stream(base_url, engine)
    chunks = response.iter_content(chunk_size=None, decode_unicode=True)
    assert next(chunks) == "word"
    for _ in range(3):
        ping = requests.get(f"{base_url}/ping", headers={"X-API-Key": API_KEY}, timeout=30)
        assert ping.json() == {"status": "ok"}
        assert engine.stats().running == 1  # the generation is still going on
    response.close()
    wait_until(lambda: engine.stats().running == 0, what="the stream to be cancelled")


def test_disconnect_mid_stream_cancels_the_generation(base_url: str, engine: ScriptedEngine) -> None:
    response = _open_long_stream(base_url, engine)
    chunks = response.iter_content(chunk_size=None, decode_unicode=True)
    received = [next(chunks) for _ in range(5)]
    assert received[0] == "word"
    assert engine.stats().running == 1
    response.close()  # the client goes away
    wait_until(lambda: engine.stats().running == 0, what="the engine to drop the generation")


def test_disconnect_mid_improvement_stream_stops_the_pipeline(base_url: str, engine: ScriptedEngine) -> None:
    before = len(engine.requests)
    response = _open_long_stream(base_url, engine, improvement=True, intermediate_steps=True)
    chunks = response.iter_content(chunk_size=None, decode_unicode=True)
    assert next(chunks).startswith("### Draft answer")
    next(chunks)
    response.close()
    wait_until(lambda: engine.stats().running == 0, what="the draft pass to be cancelled")
    assert len(engine.requests) == before + 1  # no review pass was started after the cancel


def test_disconnect_during_blocking_cancels_the_generation(base_url: str, engine: ScriptedEngine) -> None:
    engine.reply = LONG_REPLY
    engine.delay_s = 0.02
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi", "max_new_tokens": LONG_WORDS},
                      headers={"X-API-Key": API_KEY}, timeout=(10, 0.5))
    wait_until(lambda: engine.stats().running == 0, what="the blocking generation to be cancelled")


def test_concurrent_streams_are_independent(base_url: str, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "alpha beta gamma" if "first" in prompt else "one two three"
    results: dict[str, str] = {}

    def run(name: str) -> None:
        r = requests.post(f"{base_url}/chat/stream", json={"prompt": f"{name} question"},
                          headers={"X-API-Key": API_KEY}, stream=True)
        results[name] = "".join(r.iter_content(chunk_size=None, decode_unicode=True))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {"first": "alpha beta gamma[[END]]", "second": "one two three[[END]]"}


# --- logs ---------------------------------------------------------------------------------------
def test_query_keys_never_reach_the_logs(engine: ScriptedEngine) -> None:
    secret = "query-secret-key-42"
    app = create_app(lambda: engine, settings=ServerSettings(api_keys=(secret,), system_prompts=PROMPTS))
    capture = LogCapture()
    with serving(app, access_log=True) as url:  # uvicorn (re)configures its loggers at start: attach after
        with capture.attached("uvicorn.access", "uvicorn.error", "llm_server", ""):
            assert requests.get(f"{url}/ping?x_api_key={secret}").status_code == 200
            assert requests.get(f"{url}/chat/blocking", params={"prompt": "hi", "x_api_key": secret}).ok
            assert requests.get(f"{url}/ping?x_api_key=wrong-{secret}").status_code == 401
    access = [line for line in capture.lines if "/ping" in line]
    assert access, capture.lines
    assert any("x_api_key=***" in line for line in capture.lines)
    assert not [line for line in capture.lines if secret in line]


# --- the real engine (tiny random Llama, embedded tokenizer) ------------------------------------
def test_end_to_end_with_the_batch_engine(tokenizer: Any, tiny_model: Any) -> None:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    engine = BatchEngine(tokenizer, tiny_model, "tiny-llama",
                         EngineConfig(max_running=4, max_waiting=8, max_total_tokens=4096, seed=0))
    with serving(create_app(lambda: engine, settings=make_settings())) as url:
        headers = {"X-API-Key": API_KEY}
        body = requests.post(f"{url}/chat/blocking", json={"prompt": "Hi", "max_new_tokens": 6, "temperature": 0},
                             headers=headers, timeout=120).json()
        assert isinstance(body["reply"], str) and set(body) == {"reply"}
        again = requests.post(f"{url}/chat/blocking", json={"prompt": "Hi", "max_new_tokens": 6, "temperature": 0},
                              headers=headers, timeout=120).json()
        assert again == body  # greedy: same prompt, same reply

        response = requests.post(f"{url}/chat/stream", headers=headers, stream=True, timeout=120,
                                 json={"prompt": "Hi", "max_new_tokens": 6, "temperature": 0})
        chunks = list(response.iter_content(chunk_size=None, decode_unicode=True))
        assert chunks[-1] == "[[END]]"
        assert "".join(chunks[:-1]) == body["reply"]

        steps = requests.post(f"{url}/chat/blocking", headers=headers, timeout=300,
                              json={"prompt": "Hi", "improvement": True, "intermediate_steps": True,
                                    "max_new_tokens": 6}).json()
        assert set(steps) == {"reply", *STAGES}

        too_long = requests.post(f"{url}/chat/blocking", headers=headers, timeout=60,
                                 json={"prompt": "hello " * 5000, "max_new_tokens": 6})
        assert too_long.status_code == 400
        assert error_of(too_long)["code"] == "context_length_exceeded"
        wait_until(lambda: engine.stats().running == 0, what="the engine to be idle")
