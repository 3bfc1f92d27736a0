"""The production credential end to end: ``DefaultAzureCredential`` gets a real token, offline.

``build_key_store(settings)`` with no credential injected makes ``azure.identity``'s
``DefaultAzureCredential``, exactly as ``start_llm_server`` does. The test environment is an
App Service with a managed identity: ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` point at
:class:`tests.fake_keyvault.FakeManagedIdentityEndpoint` (loopback HTTP), every other source of
the chain is emptied (no service-principal or workload-identity variables, no Azure CLI login
reachable), so the chain's ``ManagedIdentityCredential`` fetches the token. The real
``SecretClient`` then runs Key Vault's bearer challenge against
:class:`tests.fake_keyvault.FakeKeyVault` with that token. Covered: the token request
(identity header, the vault's resource), the vault seeing that exact bearer token, keys
enforced over HTTP, and a refusing token endpoint failing the start with a clear error.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from llm_server.api import server as server_module
from llm_server.api.plumbing.auth import RefreshingKeyStore, build_key_store
from llm_server.api.plumbing.keyvault import KeyVaultError
from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from tests.fake_keyvault import REFUSAL, FakeKeyVault, FakeManagedIdentityEndpoint, use_test_vault_host
from tests.fakes import ScriptedEngine
from tests.spec_harness import serving, wait_until

SECRET = "llm-server-api-keys"

#: Variables that would select another credential of the chain (or another managed-identity flavour).
_OTHER_IDENTITY_VARIABLES = (
    "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_USERNAME", "AZURE_PASSWORD", "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST", "AZURE_TOKEN_CREDENTIALS", "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET",
    "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def identity(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManagedIdentityEndpoint]:
    """This process looks like an App Service with a managed identity, and nothing else."""
    for name in _OTHER_IDENTITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"  # no ~/.azure (CLI login, token cache) of whoever runs the tests
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(home / ".azure"))
    use_test_vault_host(ca, tmp_path, monkeypatch)
    endpoint = FakeManagedIdentityEndpoint(token=f"mi-token-{secrets.token_hex(8)}",
                                           identity_header=secrets.token_hex(16))
    monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
    monkeypatch.setenv("IDENTITY_HEADER", endpoint.identity_header)
    yield endpoint
    endpoint.stop()


@pytest.fixture
def vault(ca: trustme.CA, identity: FakeManagedIdentityEndpoint) -> Iterator[FakeKeyVault]:
    """A vault that accepts only the token the managed identity endpoint issues."""
    fake = FakeKeyVault(ca, {SECRET: "vault-key-1,vault-key-2"})
    fake.token = identity.token
    yield fake
    fake.stop()


def vault_settings(vault: FakeKeyVault) -> ServerSettings:
    return ServerSettings(key_vault_url=vault.url, key_vault_secret_name=SECRET, key_refresh_interval_s=0.1,
                          api_keys=("local-key-not-used",))


def status_with(url: str, key: str) -> int:
    return requests.get(f"{url}/ping", headers={"X-API-Key": key}, timeout=30).status_code


def test_default_credential_token_opens_the_vault(
    identity: FakeManagedIdentityEndpoint, vault: FakeKeyVault, tokenizer: Any
) -> None:
    settings = vault_settings(vault)
    store = build_key_store(settings)  # no credential injected: the production DefaultAzureCredential
    assert isinstance(store, RefreshingKeyStore)
    app = create_app(lambda: ScriptedEngine(tokenizer, reply="ok"), settings=settings, key_store=store)
    with serving(app) as url:
        assert status_with(url, "vault-key-1") == 200
        assert status_with(url, "vault-key-2") == 200
        assert status_with(url, "local-key-not-used") == 401
        assert status_with(url, "wrong") == 401
        # the periodic refresh keeps using the cached token: the identity endpoint is asked once
        wait_until(lambda: sum(authorized for _, authorized in vault.log) >= 3, what="a few vault refreshes")
        assert store.last_error is None

    # The token request: App Service protocol, the identity header, the vault's resource (no "/.default").
    assert len(identity.requests) == 1, identity.requests
    path, query, headers = identity.requests[0]
    assert path == FakeManagedIdentityEndpoint.PATH
    assert query["resource"] == vault.resource
    assert query["api-version"]
    assert headers["x-identity-header"] == identity.identity_header
    # The vault: first the unauthenticated request that draws the challenge, then that exact token.
    assert vault.log[0] == (f"/secrets/{SECRET}", False)
    assert (f"/secrets/{SECRET}", True) in vault.log


@pytest.mark.parametrize("status", [400, 500])
def test_refusing_token_endpoint_fails_the_start_with_the_reason(
    identity: FakeManagedIdentityEndpoint, vault: FakeKeyVault, status: int
) -> None:
    identity.refuse = status
    store = build_key_store(vault_settings(vault))
    try:
        with pytest.raises(KeyVaultError) as failure:
            store.start()
    finally:
        store.stop()
    message = str(failure.value)
    assert "cannot read" in message and SECRET in message and vault.url in message
    # the reason, not only "DefaultAzureCredential failed to retrieve a token"
    assert "ManagedIdentityCredential" in message and f"{status}, {REFUSAL}" in message
    assert identity.requests and all(h["x-identity-header"] == identity.identity_header
                                     for _, _, h in identity.requests)
    assert vault.log and not any(authorized for _, authorized in vault.log)


def test_start_llm_server_exits_1_when_the_identity_endpoint_refuses(
    identity: FakeManagedIdentityEndpoint, vault: FakeKeyVault, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """main() as the console script runs it (config from azure_config.yaml): exit 1, the reason on stderr."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "azure_config.yaml").write_text(
        'azure:\n  key_vault_url: "KEYVAULT_URL"\n  api_key_secret_name: "API_KEY_SECRET_NAME"\n'
    )
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(config))
    monkeypatch.setenv("KEYVAULT_URL", vault.url)
    monkeypatch.setenv("API_KEY_SECRET_NAME", SECRET)
    monkeypatch.setattr(server_module, "configure_logging", lambda *a, **k: None)

    def run_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server must not start without its API keys")

    monkeypatch.setattr(server_module, "run_server", run_server)
    identity.refuse = 400
    with pytest.raises(SystemExit) as exit_:
        server_module.main([])
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    assert "start_llm_server: error: cannot read" in stderr and vault.url in stderr
    assert "ManagedIdentityCredential" in stderr and REFUSAL in stderr and "will not start" in stderr
    assert identity.requests
