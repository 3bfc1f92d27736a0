"""Bad input on the spec's endpoints: a 4xx with a JSON body naming the problem, never a 500,
never a hang, and the server keeps serving (``/ping`` answers after every case)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from tests.fakes import ScriptedEngine
from tests.spec_harness import API_KEY, error_of, serving

MAX_CONTEXT = 256
MAX_NEW_TOKENS = 64
MAX_BODY = 8192
HEADERS = {"X-API-Key": API_KEY}
ENDPOINTS = ("/chat/blocking", "/chat/stream")


@pytest.fixture(scope="module")
def base_url(tokenizer: Any) -> Iterator[str]:
    engine = ScriptedEngine(tokenizer, reply="ok", max_context=MAX_CONTEXT)
    settings = ServerSettings(
        api_keys=(API_KEY,),
        system_prompts={"assistant": "Be brief.", "reviser": "Revise."},
        max_new_tokens_limit=MAX_NEW_TOKENS,
        max_body_bytes=MAX_BODY,
    )
    with serving(create_app(lambda: engine, settings=settings)) as url:
        yield url


def _assert_still_serving(base_url: str) -> None:
    ping = requests.get(f"{base_url}/ping", headers=HEADERS, timeout=30)
    assert ping.status_code == 200 and ping.json() == {"status": "ok"}
    ok = requests.post(f"{base_url}/chat/blocking", json={"prompt": "hi"}, headers=HEADERS, timeout=30)
    assert ok.json() == {"reply": "ok"}


def _check(response: requests.Response, status: int, mentions: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = error_of(response)
    assert mentions.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err


LONG_TEXT = "lorem ipsum dolor sit amet " * 80  # far more than MAX_CONTEXT tokens

JSON_CASES: list[tuple[str, Any, str, str | None]] = [
    # (case id, JSON body, text the message must mention, param)
    ("body-is-a-list", [1, 2, 3], "JSON object", None),
    ("body-is-a-string", "hello", "JSON object", None),
    ("body-is-null", None, "JSON object", None),
    ("missing-prompt", {"history": []}, "prompt", "prompt"),
    ("empty-prompt", {"prompt": ""}, "prompt", "prompt"),
    ("blank-prompt", {"prompt": "   \n"}, "prompt", "prompt"),
    ("prompt-not-a-string", {"prompt": 42}, "prompt", "prompt"),
    ("string-for-improvement", {"prompt": "hi", "improvement": "yes"}, "boolean", "improvement"),
    ("string-true-for-steps", {"prompt": "hi", "intermediate_steps": "true"}, "boolean", "intermediate_steps"),
    ("number-for-improvement", {"prompt": "hi", "improvement": 1}, "boolean", "improvement"),
    ("string-for-max-new-tokens", {"prompt": "hi", "max_new_tokens": "5"}, "integer", "max_new_tokens"),
    ("float-for-max-new-tokens", {"prompt": "hi", "max_new_tokens": 5.5}, "integer", "max_new_tokens"),
    ("string-for-temperature", {"prompt": "hi", "temperature": "hot"}, "number", "temperature"),
    ("temperature-too-high", {"prompt": "hi", "temperature": 7}, "temperature", "temperature"),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, "top_p", "top_p"),
    ("history-not-a-list", {"prompt": "hi", "history": "earlier we talked"}, "history", "history"),
    ("history-an-object", {"prompt": "hi", "history": {"role": "user", "content": "x"}}, "history", "history"),
    ("history-item-not-object", {"prompt": "hi", "history": ["hello"]}, "history.0", "history.0"),
    ("history-unknown-role", {"prompt": "hi", "history": [{"role": "wizard", "content": "x"}]},
     "history.0.role", "history.0.role"),
    ("history-no-content", {"prompt": "hi", "history": [{"role": "user"}]}, "history.0.content", "history.0.content"),
    ("history-content-not-text", {"prompt": "hi", "history": [{"role": "user", "content": ["x"]}]},
     "history.0.content", "history.0.content"),
    ("unknown-role-name", {"prompt": "hi", "role": "pirate"}, "pirate", "role"),
    ("max-new-tokens-above-limit", {"prompt": "hi", "max_new_tokens": MAX_NEW_TOKENS + 1}, "limit", "max_new_tokens"),
    ("max-new-tokens-zero", {"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens", "max_new_tokens"),
    ("prompt-longer-than-context", {"prompt": LONG_TEXT}, "context length", "prompt"),
    ("history-longer-than-context", {"prompt": "hi", "history": [{"role": "user", "content": LONG_TEXT}]},
     "context length", "prompt"),
    ("context-with-max-new-tokens", {"prompt": "lorem ipsum " * 60, "max_new_tokens": MAX_NEW_TOKENS},
     "context length", "prompt"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("case", "body", "mentions", "param"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_body(base_url: str, endpoint: str, case: str, body: Any, mentions: str, param: str | None) -> None:
    response = requests.post(f"{base_url}{endpoint}", data=json.dumps(body), headers=HEADERS, timeout=30)
    _check(response, 400, mentions, param)
    _assert_still_serving(base_url)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "hi",}', b"", b"\xff\xfe\x00garbage", b'{"prompt": "hi"'])
def test_invalid_json(base_url: str, endpoint: str, raw: bytes) -> None:
    response = requests.post(f"{base_url}{endpoint}", data=raw, headers=HEADERS, timeout=30)
    assert response.status_code == 400
    assert "json" in error_of(response)["message"].lower()
    _assert_still_serving(base_url)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversized_body_is_413(base_url: str, endpoint: str) -> None:
    body = json.dumps({"prompt": "x" * (MAX_BODY + 10)})
    response = requests.post(f"{base_url}{endpoint}", data=body, headers=HEADERS, timeout=30)
    _check(response, 413, "limit")
    _assert_still_serving(base_url)


def test_oversized_chunked_body_is_413(base_url: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1000 + 2):
            yield b"y" * 1000
        yield b'"}'

    response = requests.post(f"{base_url}/chat/blocking", data=chunks(), headers=HEADERS, timeout=30)
    _check(response, 413, "limit")
    _assert_still_serving(base_url)


GET_CASES: list[tuple[str, dict[str, str], str, str | None]] = [
    ("missing-prompt", {}, "prompt", "prompt"),
    ("empty-prompt", {"prompt": ""}, "prompt", "prompt"),
    ("bad-boolean", {"prompt": "hi", "improvement": "maybe"}, "boolean", "improvement"),
    ("bad-number", {"prompt": "hi", "max_new_tokens": "many"}, "integer", "max_new_tokens"),
    ("history-not-json", {"prompt": "hi", "history": "[{oops"}, "history", "history"),
    ("history-wrong-role", {"prompt": "hi", "history": '[{"role": "bot", "content": "x"}]'},
     "history.0.role", "history.0.role"),
    ("unknown-role-name", {"prompt": "hi", "role": "pirate"}, "pirate", "role"),
    ("above-limit", {"prompt": "hi", "max_new_tokens": str(MAX_NEW_TOKENS + 1)}, "limit", "max_new_tokens"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("case", "params", "mentions", "param"), GET_CASES, ids=[c[0] for c in GET_CASES])
def test_bad_query(base_url: str, endpoint: str, case: str, params: dict[str, str], mentions: str,
                   param: str | None) -> None:
    response = requests.get(f"{base_url}{endpoint}", params=params, headers=HEADERS, timeout=30)
    _check(response, 400, mentions, param)
    _assert_still_serving(base_url)


def test_unknown_fields_are_ignored(base_url: str) -> None:
    body = {"prompt": "hi", "stream": True, "extra": {"nested": 1}}
    response = requests.post(f"{base_url}/chat/blocking", json=body, headers=HEADERS, timeout=30)
    assert response.json() == {"reply": "ok"}


def test_unknown_path_and_method_are_json(base_url: str) -> None:
    missing = requests.get(f"{base_url}/chat/nothing", headers=HEADERS, timeout=30)
    assert missing.status_code == 404
    error_of(missing)
    wrong = requests.put(f"{base_url}/chat/blocking", json={"prompt": "hi"}, headers=HEADERS, timeout=30)
    assert wrong.status_code == 405
    error_of(wrong)
    _assert_still_serving(base_url)
