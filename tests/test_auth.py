"""API keys on the spec's endpoints: the auth matrix, rotation, opt-outs, generated keys, redaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llm_server.api.plumbing.auth import (
    KeyStore,
    OpenAccessKeyStore,
    RedactApiKeyFilter,
    RefreshingKeyStore,
    StaticKeyStore,
    build_key_store,
    redact,
)
from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings, settings_from_config
from tests.fakes import ScriptedEngine
from tests.spec_harness import API_KEY, OTHER_KEY, error_of, serving

BODY = {"prompt": "Hello", "history": [], "improvement": False, "intermediate_steps": False}
GET_PATHS = ("/ping", "/chat/blocking?prompt=Hello", "/chat/stream?prompt=Hello")
POST_PATHS = ("/chat/blocking", "/chat/stream")


@pytest.fixture(scope="module")
def engine(tokenizer: Any) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, reply="fine")


@pytest.fixture(scope="module")
def base_url(engine: ScriptedEngine) -> Iterator[str]:
    settings = ServerSettings(api_keys=(API_KEY, OTHER_KEY))
    with serving(create_app(lambda: engine, settings=settings)) as url:
        yield url


def _get(url: str, **kwargs: Any) -> requests.Response:
    return requests.get(url, timeout=30, **kwargs)


def _post(url: str, **kwargs: Any) -> requests.Response:
    return requests.post(url, json=BODY, timeout=30, **kwargs)


# --- the matrix -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GET_PATHS)
def test_get_without_key_is_401_json(base_url: str, path: str) -> None:
    response = _get(base_url + path)
    assert response.status_code == 401
    err = error_of(response)
    assert err["type"] == "authentication_error" and err["code"] == "missing_api_key"
    assert "X-API-Key" in err["message"]


@pytest.mark.parametrize("path", POST_PATHS)
def test_post_without_key_is_401_json(base_url: str, path: str) -> None:
    response = _post(base_url + path)
    assert response.status_code == 401
    assert error_of(response)["code"] == "missing_api_key"


@pytest.mark.parametrize("path", GET_PATHS)
@pytest.mark.parametrize("how", ["header", "bearer", "query"])
def test_get_with_wrong_key_is_401(base_url: str, path: str, how: str) -> None:
    response = _present(base_url + path, "wrong-key", how)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", GET_PATHS)
@pytest.mark.parametrize("how", ["header", "bearer", "query"])
@pytest.mark.parametrize("key", [API_KEY, OTHER_KEY])
def test_get_with_a_valid_key_passes(base_url: str, path: str, how: str, key: str) -> None:
    response = _present(base_url + path, key, how)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("how", ["header", "bearer"])
def test_post_with_a_valid_key_passes(base_url: str, path: str, how: str) -> None:
    headers = {"X-API-Key": API_KEY} if how == "header" else {"Authorization": f"Bearer {API_KEY}"}
    assert _post(base_url + path, headers=headers).status_code == 200


@pytest.mark.parametrize("path", POST_PATHS)
def test_post_does_not_accept_the_query_key(base_url: str, path: str) -> None:
    response = _post(f"{base_url}{path}?x_api_key={API_KEY}")
    assert response.status_code == 401


@pytest.mark.parametrize("path", POST_PATHS)
def test_post_with_wrong_key_is_401(base_url: str, path: str) -> None:
    response = _post(base_url + path, headers={"X-API-Key": API_KEY + "x"})
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"


def test_a_prefix_of_a_key_is_not_a_key(base_url: str) -> None:
    assert _get(base_url + "/ping", headers={"X-API-Key": API_KEY[:-1]}).status_code == 401
    assert _get(base_url + "/ping", headers={"X-API-Key": f"{API_KEY},{OTHER_KEY}"}).status_code == 401


def _present(url: str, key: str, how: str) -> requests.Response:
    if how == "header":
        return _get(url, headers={"X-API-Key": key})
    if how == "bearer":
        return _get(url, headers={"Authorization": f"Bearer {key}"})
    separator = "&" if "?" in url else "?"
    return _get(f"{url}{separator}x_api_key={key}")


# --- switches -----------------------------------------------------------------------------------
def test_query_key_can_be_switched_off(engine: ScriptedEngine) -> None:
    settings = ServerSettings(api_keys=(API_KEY,), allow_query_api_key=False)
    with serving(create_app(lambda: engine, settings=settings)) as url:
        response = _get(f"{url}/ping?x_api_key={API_KEY}")
        assert response.status_code == 401
        assert "query" not in error_of(response)["message"]
        assert _get(f"{url}/ping", headers={"X-API-Key": API_KEY}).status_code == 200


def test_open_access_needs_no_key(engine: ScriptedEngine) -> None:
    with serving(create_app(lambda: engine, settings=ServerSettings(open_access=True))) as url:
        assert _get(f"{url}/ping").status_code == 200
        assert _post(f"{url}/chat/blocking").json() == {"reply": "fine"}


def test_without_any_key_one_is_generated_and_printed_once(engine: ScriptedEngine, capsys: Any) -> None:
    app = create_app(lambda: engine, settings=ServerSettings())
    with serving(app) as url:
        printed = capsys.readouterr().out
        store = app.state.keys
        assert isinstance(store, StaticKeyStore)
        keys = [word for word in printed.split() if word.startswith("llm-")]
        assert len(keys) == 1, printed
        assert _get(f"{url}/ping").status_code == 401
        assert _get(f"{url}/ping", headers={"X-API-Key": keys[0]}).status_code == 200


def test_keys_from_environment_placeholder(monkeypatch: Any) -> None:
    monkeypatch.setenv("CHAT_SERVER_API_KEY", "env-key-1, env-key-2")
    from llm_server.helper_functionality.yaml_loading import load_chat_server_config

    settings = settings_from_config(load_chat_server_config())
    assert settings.api_keys == ("env-key-1", "env-key-2")
    store = build_key_store(settings)
    assert store.matches("env-key-1") and store.matches("env-key-2") and not store.matches("env-key")


# --- key stores ------------------------------------------------------------------------------
def test_key_store_matching() -> None:
    store = KeyStore(["alpha", "beta"])
    assert store.matches("alpha") and store.matches("beta")
    assert not store.matches("") and not store.matches("alph") and not store.matches("alpha ")
    assert OpenAccessKeyStore().matches("anything")


def test_refreshing_store_rotates_and_survives_failures(caplog: Any) -> None:
    answers: list[Any] = [("old",), ("old", "new"), RuntimeError("vault down"), ("new",)]

    def fetch() -> tuple[str, ...]:
        item = answers.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    store = RefreshingKeyStore(fetch, interval_s=3600)
    store.start()
    try:
        assert store.matches("old") and not store.matches("new")
        assert store.refresh() and store.matches("new") and store.matches("old")
        with caplog.at_level(logging.WARNING):
            assert not store.refresh()
        assert store.matches("old") and store.matches("new")  # last good keys stay valid
        assert "vault down" in caplog.text and "old" not in caplog.text.replace("vault down", "")
        assert store.refresh() and not store.matches("old") and store.matches("new")
    finally:
        store.stop()


def test_refreshing_store_start_failure_raises() -> None:
    def fetch() -> tuple[str, ...]:
        raise RuntimeError("unreachable")

    with pytest.raises(RuntimeError, match="unreachable"):
        RefreshingKeyStore(fetch, interval_s=1).start()


# --- redaction -------------------------------------------------------------------------------
def test_redact_rewrites_query_keys() -> None:
    assert redact("GET /ping?x_api_key=abc123 HTTP/1.1") == "GET /ping?x_api_key=*** HTTP/1.1"
    assert redact("/chat/stream?prompt=hi&x_api_key=k-1&role=assistant") == (
        "/chat/stream?prompt=hi&x_api_key=***&role=assistant"
    )
    assert redact("nothing secret here") == "nothing secret here"


def test_redaction_filter_rewrites_uvicorn_access_records() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/ping?x_api_key=topsecret", "1.1", 200), None,
    )
    assert RedactApiKeyFilter().filter(record)
    assert "topsecret" not in record.getMessage()
    assert "x_api_key=***" in record.getMessage()
