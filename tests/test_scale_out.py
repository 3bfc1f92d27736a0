"""The server on Ray Serve: two replicas of a tiny random Llama behind one endpoint, on a local
Ray instance (``ray.init(num_cpus=2)``). Marked ``ray`` (``-m 'not ray'`` deselects them).

What a user relies on: both replicas answer (``X-Replica-Id``), the spec's stream arrives in
pieces and ends in ``[[END]]``, the official ``openai`` client works, keys are checked in every
replica and a key rotated in Key Vault reaches every replica, a disconnect cancels the
generation on its replica, ``/health`` and ``/metrics`` speak for the deployment, and killing a
replica keeps the endpoint answering (its in-flight requests get the API's JSON error).

The API keys come from Azure Key Vault, as in production: each replica's own key store reads
:class:`tests.fake_keyvault.FakeKeyVault` (HTTPS, bearer challenge) with the real SDK and
``DefaultAzureCredential``, which gets its token from
:class:`tests.fake_keyvault.FakeManagedIdentityEndpoint`. Replicas are separate processes, so
what the in-process Key Vault tests patch is given to every Ray worker instead: the CA bundle
and identity endpoint as environment variables, the vault's host name through a worker setup
hook (:func:`tests.scale_out_engine.resolve_test_vault`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import trustme

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llm_server[ray]')")

from ray import serve  # noqa: E402

from llm_server.api.settings import ServerSettings  # noqa: E402
from llm_server.engine.types import SamplingParams  # noqa: E402
from llm_server.scale_out.config import ScaleOutConfig  # noqa: E402
from llm_server.scale_out.deployment import build_application  # noqa: E402
from llm_server.scale_out.proxy_errors import controller_options  # noqa: E402
from tests import scale_out_engine  # noqa: E402
from tests.fake_keyvault import VAULT_HOST, FakeKeyVault, FakeManagedIdentityEndpoint  # noqa: E402
from tests.spec_harness import free_port, wait_until  # noqa: E402

pytestmark = pytest.mark.ray

KEY = "scale-out-test-key"
HEADERS = {"X-API-Key": KEY}
SECRET = "llm-server-api-keys"
#: Seconds between each replica's Key Vault reads.
REFRESH_S = 0.5
APP = "llm_server_test"
#: Generous bounds for a 2-core machine shared with other work (they bound failures, not speed).
START_TIMEOUT_S = 240
LONG_TOKENS = 900


@dataclass
class Vault:
    """The fake vault, and the environment a Ray worker needs to read it as a managed identity."""

    fake: FakeKeyVault
    worker_env: dict[str, str]


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    """A Key Vault holding ``KEY``, readable with the managed identity's token (see the docstring)."""
    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("vault") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    identity = FakeManagedIdentityEndpoint(token=f"mi-token-{secrets.token_hex(8)}",
                                           identity_header=secrets.token_hex(16))
    fake = FakeKeyVault(ca, {SECRET: KEY})
    fake.token = identity.token
    env = {"REQUESTS_CA_BUNDLE": str(bundle), "NO_PROXY": f"{VAULT_HOST},127.0.0.1,localhost",
           "IDENTITY_ENDPOINT": identity.url, "IDENTITY_HEADER": identity.identity_header,
           scale_out_engine.VAULT_HOST_ENV: VAULT_HOST}
    yield Vault(fake, env)
    fake.stop()
    identity.stop()


@pytest.fixture(scope="module")
def base_url(vault: Vault) -> Iterator[str]:
    ray.cloudpickle.register_pickle_by_value(scale_out_engine)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": vault.worker_env,
                          "worker_process_setup_hook": scale_out_engine.resolve_test_vault})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())
        settings = ServerSettings(key_vault_url=vault.fake.url, key_vault_secret_name=SECRET,
                                  key_refresh_interval_s=REFRESH_S, shutdown_timeout_s=2,
                                  default_params=SamplingParams(max_new_tokens=8, do_sample=False))
        options = ScaleOutConfig(replicas=2, num_cpus=0.5, app_name=APP)
        serve.run(build_application(settings, options, scale_out_engine.tiny_engine), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(base_url: str, **payload: Any) -> requests.Response:
    return requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hello", **payload}, headers=HEADERS, timeout=120)


def _replicas_running(count: int) -> bool:
    deployments = serve.status().applications[APP].deployments.values()
    return all({getattr(state, "value", state): n for state, n in d.replica_states.items()}.get("RUNNING", 0) == count
               for d in deployments)


def _metric_sum(base_url: str, name: str, **labels: str) -> float:
    text = requests.get(f"{base_url}/metrics", timeout=60).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_both_replicas_answer_the_spec_endpoint(base_url: str) -> None:
    seen: set[str] = set()
    for i in range(40):  # different conversations: prefix affinity sends one conversation to one replica
        response = _chat(base_url, prompt=f"Hello number {i}")
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["reply"], str)
        seen.add(response.headers["x-replica-id"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"only replica(s) {seen} answered 40 requests"


def test_stream_arrives_in_pieces_and_ends_with_the_marker(base_url: str) -> None:
    with requests.post(f"{base_url}/chat/stream", json={"prompt": "Tell me a story", "max_new_tokens": 48},
                       headers=HEADERS, stream=True, timeout=120) as response:
        assert response.status_code == 200
        chunks = [chunk for chunk in response.iter_content(chunk_size=None) if chunk]
    text = b"".join(chunks).decode("utf-8")
    assert text.endswith("[[END]]")
    assert len(chunks) >= 3, f"the stream came in {len(chunks)} piece(s): buffered"


def test_openai_client_through_serve(base_url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny-llama", max_tokens=8,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="tiny-llama", max_tokens=8, stream=True, messages=[{"role": "user", "content": "Hi"}]) if c.choices]
    assert len([p for p in pieces if p]) >= 2


def test_chat_page_and_one_request_id(base_url: str) -> None:
    page = requests.get(f"{base_url}/", timeout=60)
    assert page.status_code == 200 and "<html" in page.text.lower()
    response = requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi"},
                             headers={**HEADERS, "X-Request-Id": "trace-me-42"}, timeout=120)
    assert response.headers["x-request-id"] == "trace-me-42"


def test_every_replica_checks_the_key(base_url: str) -> None:
    for _ in range(6):
        response = requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi"},
                                 headers={"X-API-Key": "wrong"}, timeout=60)
        assert response.status_code == 401
        assert "x-replica-id" in response.headers
    assert _chat(base_url).status_code == 200  # healthy after


def _statuses_by_replica(base_url: str, key: str, requests_count: int = 16) -> dict[str, set[int]]:
    """The statuses each replica gave ``requests_count`` requests with ``key`` (a cheap keyed GET)."""
    seen: dict[str, set[int]] = {}
    for _ in range(requests_count):
        response = requests.get(f"{base_url}/v1/models", headers={"X-API-Key": key}, timeout=60)
        seen.setdefault(response.headers["x-replica-id"], set()).add(response.status_code)
    return seen


def _every_replica_answers(base_url: str, key: str, status: int) -> bool:
    seen = _statuses_by_replica(base_url, key)
    return len(seen) == 2 and all(statuses == {status} for statuses in seen.values())


def test_a_key_rotated_in_key_vault_reaches_every_replica(base_url: str, vault: Vault) -> None:
    """Each replica re-reads the vault every REFRESH_S: after a rotation, the new key works on both
    replicas and the old one is refused by both, without a restart."""
    rotated = f"rotated-{secrets.token_hex(8)}"
    assert _every_replica_answers(base_url, KEY, 200)
    assert _every_replica_answers(base_url, rotated, 401)
    vault.fake.secrets[SECRET] = rotated
    try:
        wait_until(lambda: _every_replica_answers(base_url, rotated, 200), timeout_s=60,
                   what="both replicas to accept the rotated key")
        assert _every_replica_answers(base_url, KEY, 401), "a replica still accepts the key rotated out"
        chat = requests.post(f"{base_url}/chat/blocking", json={"prompt": "Hi"}, headers={"X-API-Key": rotated},
                             timeout=120)
        assert chat.status_code == 200, chat.text
    finally:
        vault.fake.secrets[SECRET] = KEY
    wait_until(lambda: _every_replica_answers(base_url, KEY, 200), timeout_s=60, what="the key to be restored")


def test_bad_input_is_refused_by_the_replica(base_url: str) -> None:
    response = requests.post(f"{base_url}/chat/blocking", json={"prompt": 5}, headers=HEADERS, timeout=60)
    assert response.status_code in (400, 422)
    assert "prompt" in response.text
    assert _chat(base_url).status_code == 200


def test_health_reports_the_deployment(base_url: str) -> None:
    body = requests.get(f"{base_url}/health", timeout=60).json()
    assert body["status"] == "ok"
    assert body["deployment"]["running_replicas"] == 2
    assert body["replica"]


def test_metrics_cover_every_replica(base_url: str) -> None:
    wait_until(lambda: len(set(re.findall(r'replica="([^"]+)"', requests.get(f"{base_url}/metrics",
                                                                         timeout=60).text))) == 2,
               timeout_s=60, what="both replicas in /metrics")


def test_disconnect_cancels_the_generation_on_its_replica(base_url: str) -> None:
    cancelled = "llm_server_generations_finished_total"
    before = _metric_sum(base_url, cancelled, finish_reason="cancelled")
    with requests.post(f"{base_url}/chat/stream", json={"prompt": "Go on", "max_new_tokens": LONG_TOKENS},
                       headers=HEADERS, stream=True, timeout=120) as response:
        assert response.status_code == 200
        next(response.iter_content(chunk_size=None))  # generating: now hang up
    wait_until(lambda: _metric_sum(base_url, cancelled, finish_reason="cancelled") > before,
               timeout_s=60, what="the generation to be cancelled")
    wait_until(lambda: _metric_sum(base_url, "llm_server_requests_running") == 0, timeout_s=60,
               what="the engines to be idle")


def _running_by_replica(base_url: str) -> dict[str, float]:
    text = requests.get(f"{base_url}/metrics", timeout=60).text
    found = re.findall(r'^llm_server_requests_running\{replica="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    return {replica: float(value) for replica, value in found}


def test_killing_a_replica_keeps_the_endpoint_answering(base_url: str) -> None:
    """In flight on the killed replica: the stream is cut and blocking requests get the API's JSON
    500 ``replica_failed`` (never a hang); elsewhere they finish; then new requests all go to the
    healthy replica."""
    long_chat: dict[str, Any] = {"prompt": "Go on", "max_new_tokens": LONG_TOKENS}
    with requests.post(f"{base_url}/chat/stream", json=long_chat, headers=HEADERS, stream=True,
                       timeout=120) as response:
        victim = response.headers["x-replica-id"]
        pieces = response.iter_content(chunk_size=None)
        next(pieces)
        with ThreadPoolExecutor(3) as pool:  # different openings: affinity may put them on either replica
            blocking = [pool.submit(_chat, base_url, **{**long_chat, "prompt": f"Go on {i}"}) for i in range(3)]
            wait_until(lambda: sum(_running_by_replica(base_url).values()) == 4, timeout_s=60,
                       what="the blocking requests to run")
            on_victim = int(_running_by_replica(base_url)[victim]) - 1  # minus the stream
            ray.kill(_replica_actor(victim), no_restart=True)
            with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut short: never a hang
                text = b"".join(pieces).decode("utf-8")
                raise AssertionError(f"the stream of a killed replica ended normally: {text[-80:]!r}")
            results = [future.result(timeout=120) for future in blocking]
    statuses = sorted(result.status_code for result in results)
    assert statuses == [200] * (3 - on_victim) + [500] * on_victim, (statuses, on_victim)
    for failed in (result for result in results if result.status_code == 500):
        assert failed.headers["content-type"] == "application/json", failed.text
        assert failed.json()["error"]["code"] == "replica_failed"
        assert failed.headers["x-request-id"]
    answered = [_chat(base_url) for _ in range(6)]
    assert [r.status_code for r in answered] == [200] * 6
    assert victim not in {r.headers["x-replica-id"] for r in answered}
    wait_until(lambda: _replicas_running(2), timeout_s=START_TIMEOUT_S, what="Serve to replace the replica")


def _replica_actor(replica_id: str) -> Any:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no replica actor {replica_id}")
