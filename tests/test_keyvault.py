"""API keys from Azure Key Vault, with the real Azure SDK against a local HTTPS vault.

The SDK (``azure-keyvault-secrets`` SecretClient, TLS checked against a trustme CA through
REQUESTS_CA_BUNDLE) runs Key Vault's bearer-challenge protocol against
:class:`tests.fake_keyvault.FakeKeyVault`. Covered: keys loaded and enforced over HTTP,
several keys at once, rotation without restart, vault down later (last good keys stay
valid, a warning is logged), vault down at start (clear error, non-zero exit).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from llm_server.api.plumbing.auth import RefreshingKeyStore, build_key_store
from llm_server.api.plumbing.keyvault import KeyVaultError, KeyVaultKeySource
from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from tests.fake_keyvault import TENANT, VAULT_HOST, FakeKeyVault, StaticTokenCredential, use_test_vault_host
from tests.fakes import ScriptedEngine
from tests.spec_harness import free_port, serving, wait_until

SECRET = "llm-server-api-keys"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def vault_env(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust the test CA and resolve the vault's host name to loopback (in this process)."""
    use_test_vault_host(ca, tmp_path, monkeypatch)


@pytest.fixture
def vault(ca: trustme.CA, vault_env: None) -> Iterator[FakeKeyVault]:
    fake = FakeKeyVault(ca, {SECRET: "first-key"})
    yield fake
    try:
        fake.stop()
    except OSError:
        pass


def vault_settings(vault: FakeKeyVault, interval_s: float = 0.1) -> ServerSettings:
    return ServerSettings(key_vault_url=vault.url, key_vault_secret_name=SECRET, key_refresh_interval_s=interval_s,
                          api_keys=("local-key-not-used",))


def status_with(url: str, key: str) -> int:
    return requests.get(f"{url}/ping", headers={"X-API-Key": key}, timeout=30).status_code


# --- the SDK against the fake vault ---------------------------------------------------------
def test_source_reads_the_secret_through_the_bearer_challenge(vault: FakeKeyVault) -> None:
    vault.secrets[SECRET] = "alpha, beta ,gamma"
    credential = StaticTokenCredential()
    source = KeyVaultKeySource(vault.url, SECRET, credential)
    assert source.fetch() == ("alpha", "beta", "gamma")
    assert vault.log[0] == (f"/secrets/{SECRET}", False)  # challenge elicited without a token
    assert vault.log[-1] == (f"/secrets/{SECRET}", True)
    scopes, kwargs = credential.calls[0]
    assert scopes == (f"{vault.resource}/.default",)
    assert kwargs.get("tenant_id") == TENANT


def test_missing_or_empty_secret_is_an_error(vault: FakeKeyVault) -> None:
    with pytest.raises(KeyVaultError, match="nope"):
        KeyVaultKeySource(vault.url, "nope", StaticTokenCredential()).fetch()
    vault.secrets[SECRET] = " , "
    with pytest.raises(KeyVaultError, match="empty"):
        KeyVaultKeySource(vault.url, SECRET, StaticTokenCredential()).fetch()


def test_production_path_uses_default_azure_credential(vault: FakeKeyVault) -> None:
    from azure.identity import DefaultAzureCredential

    store = build_key_store(vault_settings(vault))
    assert isinstance(store, RefreshingKeyStore)
    source = store._fetch.__self__  # the bound KeyVaultKeySource.fetch
    assert isinstance(source, KeyVaultKeySource)
    assert isinstance(source.credential, DefaultAzureCredential)
    assert source.vault_url == vault.url and source.secret_name == SECRET


def _spy_close(monkeypatch: pytest.MonkeyPatch, target: Any) -> list[str]:
    """Record ``target.close()`` calls (the real close still runs)."""
    calls: list[str] = []
    real = target.close

    def close() -> None:
        calls.append(type(target).__name__)
        real()

    monkeypatch.setattr(target, "close", close)
    return calls


def test_stop_closes_the_vault_client(vault: FakeKeyVault, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SecretClient (its connection pool) is closed when the store stops, once; a
    credential the caller passed in is the caller's to close."""
    credential = StaticTokenCredential()
    store = build_key_store(vault_settings(vault), credential=credential)
    assert isinstance(store, RefreshingKeyStore)
    source = store._fetch.__self__
    client_closed = _spy_close(monkeypatch, source._client)
    store.start()
    assert store.matches("first-key")
    store.stop()
    store.stop()
    assert client_closed == ["SecretClient"]
    assert source.credential is credential


def test_stop_closes_the_default_credential_it_made(vault: FakeKeyVault, monkeypatch: pytest.MonkeyPatch) -> None:
    store = build_key_store(vault_settings(vault))
    assert isinstance(store, RefreshingKeyStore)
    source = store._fetch.__self__
    client_closed = _spy_close(monkeypatch, source._client)
    credential_closed = _spy_close(monkeypatch, source.credential)
    store.stop()  # never started (e.g. the server failed before serving): still released
    assert client_closed == ["SecretClient"] and credential_closed == ["DefaultAzureCredential"]


# --- through the server ------------------------------------------------------------------------
@pytest.fixture
def served(vault: FakeKeyVault, tokenizer: Any) -> Iterator[tuple[str, RefreshingKeyStore]]:
    settings = vault_settings(vault)
    store = build_key_store(settings, credential=StaticTokenCredential())
    assert isinstance(store, RefreshingKeyStore)
    app = create_app(lambda: ScriptedEngine(tokenizer, reply="ok"), settings=settings, key_store=store)
    with serving(app) as url:
        yield url, store


def test_vault_keys_are_enforced(served: tuple[str, RefreshingKeyStore]) -> None:
    url, _ = served
    assert status_with(url, "first-key") == 200
    assert status_with(url, "local-key-not-used") == 401  # the vault wins over local keys
    assert status_with(url, "wrong") == 401


def test_rotation_takes_effect_without_restart(served: tuple[str, RefreshingKeyStore], vault: FakeKeyVault) -> None:
    url, _ = served
    vault.secrets[SECRET] = "first-key,second-key"  # rotation step 1: both valid
    wait_until(lambda: status_with(url, "second-key") == 200, what="the new key to be accepted")
    assert status_with(url, "first-key") == 200
    vault.secrets[SECRET] = "second-key"  # rotation step 2: the old key is retired
    wait_until(lambda: status_with(url, "first-key") == 401, what="the old key to be refused")
    assert status_with(url, "second-key") == 200


def test_vault_down_later_keeps_the_last_good_keys(
    served: tuple[str, RefreshingKeyStore], vault: FakeKeyVault, caplog: pytest.LogCaptureFixture
) -> None:
    url, store = served
    vault.secrets[SECRET] = "kept-key"
    wait_until(lambda: status_with(url, "kept-key") == 200, what="the key to load")
    with caplog.at_level(logging.WARNING, logger="llm_server.api.plumbing.auth"):
        vault.stop()
        wait_until(lambda: store.last_error is not None, what="a failed refresh")
        assert status_with(url, "kept-key") == 200
        assert status_with(url, "first-key") == 401
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keeping the 1 last good key" in w for w in warnings), warnings
    assert not any("kept-key" in w for w in warnings)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's failed start
def test_vault_down_at_start_fails_the_start(ca: trustme.CA, vault_env: None, tokenizer: Any) -> None:
    settings = ServerSettings(key_vault_url=f"https://{VAULT_HOST}:{free_port()}/", key_vault_secret_name=SECRET)
    store = build_key_store(settings, credential=StaticTokenCredential())
    with pytest.raises(KeyVaultError, match="cannot read"):
        store.start()
    app = create_app(lambda: ScriptedEngine(tokenizer), settings=settings, key_store=store)
    with pytest.raises(RuntimeError, match="failed to start"):
        with serving(app):
            pass


def test_start_llm_server_exits_nonzero_when_the_vault_is_unreachable(tmp_path: Path) -> None:
    """The real console script, real DefaultAzureCredential: a clear error and exit status 1."""
    (tmp_path / "azure_config.yaml").write_text(
        'azure:\n  key_vault_url: "KEYVAULT_URL"\n  api_key_secret_name: "API_KEY_SECRET_NAME"\n'
    )
    vault_url = f"https://127.0.0.1:{free_port()}/"
    env = {**os.environ, "KEYVAULT_URL": vault_url, "API_KEY_SECRET_NAME": SECRET}
    script = Path(sys.executable).with_name("start_llm_server")
    done = subprocess.run(
        [str(script), "--config-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert done.returncode == 1, done.stderr
    assert "Azure Key Vault" in done.stderr and vault_url in done.stderr and SECRET in done.stderr
    assert "Uvicorn running" not in done.stderr
