"""Prefix affinity on Ray Serve: two replicas of a tiny random Llama behind one endpoint, on a local
Ray instance, the proxy and router as ``start_llm_server --replicas`` configures them. Marked ``ray``.

What a user relies on: every turn of a conversation reaches the same replica (its prefix cache
then serves turn 2 on: ``cached_tokens`` > 0), different conversations spread over both replicas,
a client's ``x-session-id`` wins over the conversation's opening, and a replica holding more than
``affinity_max_imbalance`` requests above the other one loses the next request to it.

Which replica a session prefers is computable: rendezvous hashing of the session key over the
replica ids (``X-Replica-Id``), so the tests check the exact replica, not only stickiness.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llm_server[ray]')")

from ray import serve  # noqa: E402

from llm_server.api.settings import ServerSettings  # noqa: E402
from llm_server.engine.types import SamplingParams  # noqa: E402
from llm_server.scale_out.affinity import session_key  # noqa: E402
from llm_server.scale_out.affinity_router import rendezvous_order  # noqa: E402
from llm_server.scale_out.config import ScaleOutConfig  # noqa: E402
from llm_server.scale_out.deployment import build_application  # noqa: E402
from llm_server.scale_out.proxy_errors import controller_options  # noqa: E402
from tests import scale_out_engine  # noqa: E402
from tests.spec_harness import free_port  # noqa: E402

pytestmark = pytest.mark.ray

KEY = "affinity-test-key"
HEADERS = {"X-API-Key": KEY}
APP = "llm_server_affinity"
MAX_IMBALANCE = 2
SYSTEM = "You are a careful assistant. Answer from the reference notes. " * 8


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    ray.cloudpickle.register_pickle_by_value(scale_out_engine)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())
        settings = ServerSettings(api_keys=(KEY,), shutdown_timeout_s=2,
                                  default_params=SamplingParams(max_new_tokens=4, do_sample=False))
        options = ScaleOutConfig(replicas=2, num_cpus=0.5, app_name=APP, affinity_max_imbalance=MAX_IMBALANCE)
        serve.run(build_application(settings, options, scale_out_engine.tiny_engine), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def replica_ids(base_url: str) -> list[str]:
    """Both replicas' ids, from requests with different session ids."""
    seen: set[str] = set()
    for i in range(64):
        response = requests.get(f"{base_url}/v1/models", headers={**HEADERS, "x-session-id": f"probe-{i}"}, timeout=60)
        seen.add(response.headers["x-replica-id"])
        if len(seen) == 2:
            return sorted(seen)
    raise AssertionError(f"only replica(s) {seen} answered 64 sessions")


def _post(base_url: str, body: dict[str, Any], **headers: str) -> requests.Response:
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, headers={**HEADERS, **headers}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def _conversation(base_url: str, opening: str, turns: int, **headers: str) -> list[tuple[str, int]]:
    """``turns`` turns, each with the whole history: (replica, cached tokens) of each."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]
    seen = []
    for turn in range(turns):
        response = _post(base_url, {"model": "tiny-llama", "messages": messages, "max_tokens": 4}, **headers)
        reply = response.json()
        seen.append((response.headers["x-replica-id"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]))
        messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And question {turn + 2}?"}]
    return seen


def _expected(session: str, replica_ids: list[str]) -> str:
    return rendezvous_order(session, replica_ids)[0]


def test_each_conversation_stays_on_its_replica_and_conversations_spread(base_url: str, replica_ids: list[str]) -> None:
    used: set[str] = set()
    for index in range(12):
        opening = f"Conversation {index}: tell me about note {index}."
        turns = _conversation(base_url, opening, 3)
        replicas = {replica for replica, _ in turns}
        key = session_key({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]})
        assert key is not None
        assert replicas == {_expected(key, replica_ids)}, (index, turns)
        assert all(cached > 0 for _, cached in turns[1:]), f"later turns missed the prefix cache: {turns}"
        used |= replicas
    assert used == set(replica_ids), f"12 conversations all went to {used}"


def test_an_explicit_session_header_wins(base_url: str, replica_ids: list[str]) -> None:
    opening = "An opening that the session header overrides."
    key = session_key({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]})
    assert key is not None
    other = next(r for r in replica_ids if r != _expected(key, replica_ids))
    session = next(f"user-{i}" for i in range(1000) if _expected(f"user-{i}", replica_ids) == other)
    turns = _conversation(base_url, opening, 3, **{"x-session-id": session})
    assert {replica for replica, _ in turns} == {other}
    spec = requests.post(f"{base_url}/chat/blocking", json={"prompt": "Something unrelated"},
                         headers={**HEADERS, "X-Session-Id": session}, timeout=120)
    assert spec.status_code == 200 and spec.headers["x-replica-id"] == other
