"""A local HTTPS server speaking Azure Key Vault's get-secret protocol, for the real Azure SDK.

It serves ``GET /secrets/{name}[/{version}]?api-version=...`` under a trustme certificate
for a vault host name (``VAULT_HOST``, resolved to 127.0.0.1 by the test), including Key
Vault's bearer challenge: a request without a valid ``Authorization: Bearer <token>`` gets
401 with ``WWW-Authenticate: Bearer authorization="<authority>/<tenant>", resource="<resource>"``,
whose resource is the vault's parent domain (as real vaults send ``https://vault.azure.net``),
so the SDK's challenge-resource verification stays on.

:class:`FakeManagedIdentityEndpoint` is the other half, for the production credential: an App
Service managed-identity token endpoint, so ``DefaultAzureCredential`` itself obtains the token
the vault accepts (``FakeKeyVault.token``), offline.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import trustme

VAULT_DOMAIN = "vault.localtest"
VAULT_HOST = f"testvault.{VAULT_DOMAIN}"
TENANT = "00000000-0000-0000-0000-0000000000aa"
TOKEN = "fake-access-token-for-the-test-vault"
#: What :class:`FakeManagedIdentityEndpoint` answers when told to refuse.
REFUSAL = "the identity service refused the request"


def use_test_vault_host(ca: trustme.CA, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust ``ca`` (REQUESTS_CA_BUNDLE) and resolve ``VAULT_HOST`` to loopback, in this process."""
    bundle = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("NO_PROXY", f"{VAULT_HOST},127.0.0.1,localhost")
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo("127.0.0.1" if host == VAULT_HOST else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class FakeKeyVault:
    """One vault holding secrets; ``secrets`` may be changed while it runs (rotation)."""

    def __init__(self, ca: trustme.CA, secrets: dict[str, str]) -> None:
        self.secrets = dict(secrets)
        #: The only bearer token the vault accepts (a test may set the one its token service issues).
        self.token = TOKEN
        self.log: list[tuple[str, bool]] = []  # (path, authorized) per request
        cert = ca.issue_cert(VAULT_HOST, "127.0.0.1")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-keyvault", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{VAULT_HOST}:{self.port}/"

    @property
    def resource(self) -> str:
        return f"https://{VAULT_DOMAIN}:{self.port}"

    def stop(self) -> None:
        """Take the vault offline: the port refuses connections from now on."""
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        vault = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")  # so stop() really takes the vault offline
                self.close_connection = True
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlparse(self.path)
                authorized = self.headers.get("Authorization") == f"Bearer {vault.token}"
                vault.log.append((url.path.rstrip("/"), authorized))
                if "api-version=" not in url.query:
                    self._send(400, {"error": {"code": "BadParameter", "message": "api-version is required"}})
                    return
                if not authorized:
                    challenge = (f'Bearer authorization="https://login.localtest/{TENANT}", '
                                 f'resource="{vault.resource}"')
                    self._send(401, {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a "
                                               "Bearer or PoP token."}}, {"WWW-Authenticate": challenge})
                    return
                parts = [p for p in url.path.split("/") if p]
                if len(parts) not in (2, 3) or parts[0] != "secrets" or parts[1] not in vault.secrets:
                    self._send(404, {"error": {"code": "SecretNotFound", "message": f"no secret at {url.path}"}})
                    return
                name = parts[1]
                now = int(time.time())
                self._send(200, {
                    "value": vault.secrets[name],
                    "id": f"{vault.url}secrets/{name}/0123456789abcdef",
                    "attributes": {"enabled": True, "created": now, "updated": now,
                                   "recoveryLevel": "Recoverable+Purgeable"},
                    "tags": {},
                })

        return Handler


class StaticTokenCredential:
    """A TokenCredential that works offline: always the fake vault's token; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.calls.append((scopes, kwargs))
        return AccessToken(TOKEN, int(time.time()) + 3600)


class FakeManagedIdentityEndpoint:
    """A local App Service managed-identity token endpoint (plain HTTP on 127.0.0.1, as on App Service).

    ``azure-identity``'s ``ManagedIdentityCredential`` (part of ``DefaultAzureCredential``) uses it
    when ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` are set: ``GET <endpoint>?api-version=2019-08-01
    &resource=<resource>`` with ``X-IDENTITY-HEADER: <header>``, answered with ``{access_token,
    expires_on, resource, token_type}``. Set ``refuse`` to an HTTP status to make it fail instead.
    Every request is recorded in ``requests`` as ``(path, query parameters, headers)``.
    """

    PATH = "/msi/token"

    def __init__(self, token: str, identity_header: str) -> None:
        self.token = token
        self.identity_header = identity_header
        self.refuse: int | None = None
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-identity", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.PATH}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                endpoint.requests.append((url.path, query, {k.lower(): v for k, v in self.headers.items()}))
                if endpoint.refuse is not None:
                    self._send(endpoint.refuse, {"statusCode": endpoint.refuse,
                                                 "message": REFUSAL})
                    return
                if url.path != endpoint.PATH or self.headers.get("X-IDENTITY-HEADER") != endpoint.identity_header:
                    self._send(401, {"statusCode": 401, "message": "missing or wrong X-IDENTITY-HEADER"})
                    return
                if not query.get("resource") or not query.get("api-version"):
                    self._send(400, {"statusCode": 400, "message": "resource and api-version are required"})
                    return
                self._send(200, {"access_token": endpoint.token, "expires_on": str(int(time.time()) + 3600),
                                 "resource": query["resource"], "token_type": "Bearer"})

        return Handler
