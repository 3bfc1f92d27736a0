"""API keys stored in Azure Key Vault: read one secret holding one or more comma-separated keys.

Authentication goes through ``azure-identity``'s ``DefaultAzureCredential`` (environment
variables, workload/managed identity, ``az login``, ...), the secret through
``azure-keyvault-secrets``' ``SecretClient``, which speaks Key Vault's bearer-challenge
protocol. :class:`KeyVaultKeySource` only fetches; caching and periodic refresh live in
``api.auth.RefreshingKeyStore``. Secret values are never logged.
"""

from __future__ import annotations

import logging
from typing import Any

from llm_server.api.settings import split_keys

logger = logging.getLogger(__name__)

#: Fail fast at start-up instead of the SDK's default (10 retries with exponential back-off).
_CLIENT_DEFAULTS: dict[str, Any] = {
    "retry_total": 2,
    "retry_backoff_factor": 0.5,
    "retry_backoff_max": 5,
    "connection_timeout": 10,
    "read_timeout": 20,
}
#: Enough for DefaultAzureCredential's list of attempted credentials (about ten lines).
_CREDENTIAL_DETAIL_LIMIT = 3000


class KeyVaultError(RuntimeError):
    """The vault could not be read, or the secret holds no key."""


def default_credential() -> Any:
    """The production credential: DefaultAzureCredential (env, managed identity, CLI login...)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


class KeyVaultKeySource:
    """Fetches the API keys held by one Key Vault secret (``"key1,key2"`` allows rotation)."""

    def __init__(self, vault_url: str, secret_name: str, credential: Any | None = None, **client_kwargs: Any) -> None:
        from azure.keyvault.secrets import SecretClient

        self.vault_url = vault_url
        self.secret_name = secret_name
        #: A credential made here is closed with the client; a caller's stays the caller's.
        self._owns_credential = credential is None
        self.credential = credential if credential is not None else default_credential()
        options = {**_CLIENT_DEFAULTS, **client_kwargs}
        self._client = SecretClient(vault_url=vault_url, credential=self.credential, **options)

    def describe(self) -> str:
        return f"secret {self.secret_name!r} in Azure Key Vault {self.vault_url}"

    def fetch(self) -> tuple[str, ...]:
        """Read the secret now; raise :class:`KeyVaultError` (never with the secret's value)."""
        try:
            secret = self._client.get_secret(self.secret_name)
        except Exception as exc:  # azure.core errors, credential errors, TLS errors...
            raise KeyVaultError(f"cannot read {self.describe()}: {_short(exc)}") from exc
        keys = split_keys(secret.value)
        if not keys:
            raise KeyVaultError(f"{self.describe()} is empty: it must hold one or more comma-separated API keys")
        return keys

    def close(self) -> None:
        """Close the SecretClient's connections (and the credential, when this source made it)."""
        closables = [self._client, self.credential] if self._owns_credential else [self._client]
        for closable in closables:
            try:
                closable.close()
            except Exception:  # pragma: no cover - closing is best effort
                logger.debug("closing %s failed", type(closable).__name__, exc_info=True)


def _short(exc: BaseException) -> str:
    """First line of an SDK error (they can be pages long), with its type.

    A credential failure keeps its following lines too: there ``DefaultAzureCredential`` lists
    each credential it tried and why it failed (e.g. the managed identity endpoint's answer),
    which is the whole diagnosis; its first line alone says only that no token was obtained.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    head = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
    if type(exc).__name__ == "ClientAuthenticationError" and len(lines) > 1:
        return "\n  ".join([head, *lines[1:]])[:_CREDENTIAL_DETAIL_LIMIT]
    return head
