"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes) on the real app, scripted engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import ScriptedEngine
from tests.openai_harness import API_KEY, build_app, live_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def served(tokenizer: Any) -> Iterator[tuple[str, ScriptedEngine]]:
    engine = ScriptedEngine(tokenizer, reply="fine", model_id="m", max_context=2048)
    with live_server(build_app(engine)) as url:
        yield url, engine


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=HEADERS if headers is None else headers)


def test_tokenize_a_prompt_and_detokenize_it_back(served: tuple[str, ScriptedEngine], tokenizer: Any) -> None:
    url, _ = served
    text = "The quick brown fox, naïvely."
    body = post(url, "/tokenize", {"model": "m", "prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == list(tokenizer(text)["input_ids"]) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = post(url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert (
        plain["tokens"] == list(tokenizer(text, add_special_tokens=False)["input_ids"]) and plain["token_strs"] is None
    )
    assert post(url, "/detokenize", {"model": "m", "tokens": plain["tokens"]}).json() == {"prompt": text}


def test_tokenize_messages_counts_what_a_chat_completion_feeds(served: tuple[str, ScriptedEngine]) -> None:
    url, engine = served
    body = post(url, "/tokenize", {"messages": CHAT}).json()
    post(url, "/v1/chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 4})
    assert body["tokens"] == engine.requests[-1].prompt_ids
    assert "<|im_start|>user" in post(url, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/tokenize", {"messages": CHAT, "add_generation_prompt": False}, 400, "add_generation_prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, None),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens.1"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": ["a"]}, 400, None),
        ("/detokenize", {}, 400, None),
    ],
)
def test_bad_requests_are_openai_errors(
    served: tuple[str, ScriptedEngine], path: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    url, _ = served
    response = post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)
    assert post(url, "/tokenize", {"prompt": "still fine"}).status_code == 200


def test_the_api_key_is_required(served: tuple[str, ScriptedEngine]) -> None:
    url, _ = served
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        assert post(url, path, body, headers={}).status_code == 401
        assert post(url, path, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
