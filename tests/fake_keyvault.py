"""A local HTTPS server speaking Azure Key Vault's get-secret protocol, for the real Azure SDK.

It serves ``GET /secrets/{name}[/{version}]?api-version=...`` under a trustme certificate
for a vault host name (``VAULT_HOST``, resolved to 127.0.0.1 by the test), including Key
Vault's bearer challenge: a request without a valid ``Authorization: Bearer <token>`` gets
401 with ``WWW-Authenticate: Bearer authorization="<authority>/<tenant>", resource="<resource>"``,
whose resource is the vault's parent domain (as real vaults send ``https://vault.azure.net``),
so the SDK's challenge-resource verification stays on.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import trustme

VAULT_DOMAIN = "vault.localtest"
VAULT_HOST = f"testvault.{VAULT_DOMAIN}"
TENANT = "00000000-0000-0000-0000-0000000000aa"
TOKEN = "fake-access-token-for-the-test-vault"


class FakeKeyVault:
    """One vault holding secrets; ``secrets`` may be changed while it runs (rotation)."""

    def __init__(self, ca: trustme.CA, secrets: dict[str, str]) -> None:
        self.secrets = dict(secrets)
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
                authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
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
