"""Prefix affinity's session key, without Ray: every turn of a conversation gets the same key in
each wire format, different openings get different keys, and the proxy middleware adds the key
(or leaves a client's own ``x-session-id`` alone) while the app behind it receives the body intact.

The middleware wraps a real Starlette app, driven by Starlette's TestClient (the ASGI calls Serve's
proxy makes); tests/test_scale_out_affinity.py runs it inside Serve's real proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from llm_server.scale_out.affinity import (
    DERIVED_PREFIX,
    SESSION_HEADER,
    SessionKeyMiddleware,
    session_key,
)

SYSTEM = "You answer from the notes."


def _openai(turns: int, system: str = SYSTEM, first: str = "Hi there") -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    for i in range(1, turns):
        messages += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"question {i}"}]
    return {"model": "m", "messages": messages, "stream": turns % 2 == 0}


def test_every_turn_of_an_openai_conversation_has_one_key() -> None:
    keys = {session_key(_openai(turns)) for turns in range(1, 6)}
    assert len(keys) == 1 and next(iter(keys)).startswith(DERIVED_PREFIX)  # type: ignore[union-attr]


def test_different_openings_get_different_keys() -> None:
    assert session_key(_openai(2)) != session_key(_openai(2, first="Something else"))
    assert session_key(_openai(2)) != session_key(_openai(2, system="Another system prompt"))


def test_content_parts_and_plain_strings_are_the_same_text() -> None:
    parts = _openai(1)
    parts["messages"][1]["content"] = [{"type": "text", "text": "Hi there"}]
    assert session_key(parts) == session_key(_openai(3))


def test_messages_api_responses_api_and_spec_chat() -> None:
    anthropic = [{"system": SYSTEM, "messages": [{"role": "user", "content": "Hi"}]},
                 {"system": SYSTEM, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                                 {"role": "assistant", "content": "Hello"},
                                                 {"role": "user", "content": "More"}]}]
    assert len({session_key(body) for body in anthropic}) == 1
    responses = [{"instructions": SYSTEM, "input": "Hi"},
                 {"instructions": SYSTEM, "input": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello"},
                                                    {"role": "user", "content": "More"}]}]
    assert len({session_key(body) for body in responses}) == 1
    spec = [{"prompt": "Hi", "role": "coder"},
            {"prompt": "More", "role": "coder", "history": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}]
    assert len({session_key(body) for body in spec}) == 1
    assert session_key({"prompt": "Hi", "role": "teacher"}) != session_key(spec[0])  # the role is the system prompt


@pytest.mark.parametrize("body", [None, 5, "text", [], {}, {"messages": "nope"}, {"model": "m"},
                                  {"input": "more", "previous_response_id": "resp_1"}])
def test_bodies_without_an_opening_get_no_key(body: Any) -> None:
    assert session_key(body) is None


def _echo_app(max_buffered_bytes: int = 1 << 20) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"session": request.headers.get(SESSION_HEADER), "body": body.decode("utf-8", "replace")})

    routes = [Route(path, echo, methods=["GET", "POST"]) for path in ("/v1/chat/completions", "/chat/stream", "/other")]
    middleware = [Middleware(SessionKeyMiddleware, max_buffered_bytes=max_buffered_bytes)]
    return Starlette(routes=routes, middleware=middleware)


def test_the_middleware_adds_the_key_and_passes_the_body_on() -> None:
    with TestClient(_echo_app()) as client:
        for turns in (1, 3):
            raw = json.dumps(_openai(turns))
            answer = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert answer.json() == {"session": session_key(_openai(1)), "body": raw}


def test_a_client_session_header_wins() -> None:
    with TestClient(_echo_app()) as client:
        answer = client.post("/v1/chat/completions", json=_openai(2), headers={"X-Session-Id": "mine"})
        assert answer.json()["session"] == "mine"


def test_the_spec_get_query_gets_the_key_of_its_post() -> None:
    history = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with TestClient(_echo_app()) as client:
        answer = client.get("/chat/stream", params={"prompt": "More", "history": history})
        assert answer.json()["session"] == session_key({"prompt": "Hi"})


def test_other_paths_bad_json_and_large_bodies_pass_unchanged() -> None:
    big = json.dumps(_openai(1, first="x" * 5000))
    with TestClient(_echo_app(max_buffered_bytes=1000)) as client:
        assert client.post("/other", json=_openai(1)).json()["session"] is None
        bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.json() == {"session": None, "body": "{not json"}
        large = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert large.json() == {"session": None, "body": big}


def test_rendezvous_order_moves_only_the_sessions_of_a_replica_that_leaves() -> None:
    pytest.importorskip("ray")
    from llm_server.scale_out.affinity_router import rendezvous_order

    replicas = ["aaaa1111", "bbbb2222", "cccc3333"]
    sessions = [f"prefix-{i}" for i in range(300)]
    before = {s: rendezvous_order(s, replicas)[0] for s in sessions}
    assert set(before.values()) == set(replicas)  # spread over all three
    after = {s: rendezvous_order(s, replicas[:2])[0] for s in sessions}
    assert all(after[s] == before[s] for s in sessions if before[s] != "cccc3333")
    assert all(rendezvous_order(s, replicas)[1] == after[s] for s in sessions if before[s] == "cccc3333")
