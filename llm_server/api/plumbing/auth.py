"""API keys: where they come from (key stores), how requests prove them, and log redaction.

Key sources, in order (see :func:`build_key_store`):

1. ``open_access`` (``--open-access``): no key is checked at all (explicit opt-out);
2. Azure Key Vault when ``azure_config.yaml`` names a vault and a secret: cached and
   re-read every ``key_refresh_interval_s`` by a background thread, so rotation needs no
   restart; if the vault becomes unreachable the last good keys stay valid;
3. ``server_config.yaml`` ``api_key`` / ``CHAT_SERVER_API_KEY`` (comma-separated keys);
4. nothing configured: a random key is generated and printed once on stdout.

Requests send the key as ``X-API-Key``, ``Authorization: Bearer``, or (GET only, when
``allow_query_api_key``) ``?x_api_key=``. Comparison is constant-time against every valid
key. :class:`RedactApiKeyFilter` keeps query-string keys out of uvicorn's access log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import Request

from llm_server.api.plumbing.errors import APIError
from llm_server.api.settings import ServerSettings

logger = logging.getLogger(__name__)

QUERY_KEY_PARAM = "x_api_key"
KeyFetcher = Callable[[], tuple[str, ...]]


# --- key stores ---------------------------------------------------------------------------
def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class KeyStore:
    """The set of currently valid keys. Subclasses decide where they come from."""

    #: True when no key is required at all.
    open_access: bool = False

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests: tuple[bytes, ...] = tuple(_digest(k) for k in keys)

    def _set_keys(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)  # one atomic swap; readers never lock

    @property
    def key_count(self) -> int:
        return len(self._digests)

    def matches(self, candidate: str) -> bool:
        """Constant-time check of ``candidate`` against every valid key (no early exit)."""
        probe = _digest(candidate)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(probe, digest)
        return found

    def start(self) -> None:
        """Load the keys (may raise); start any background refresh."""

    def stop(self) -> None:
        """Stop any background refresh."""


class StaticKeyStore(KeyStore):
    """Keys fixed for the life of the process (config / environment / generated)."""


class OpenAccessKeyStore(KeyStore):
    """No key required (``open_access: true`` / ``--open-access``)."""

    open_access = True

    def matches(self, candidate: str) -> bool:
        return True


class RefreshingKeyStore(KeyStore):
    """Keys read from ``fetch`` at start (failure raises) and re-read every ``interval_s``.

    A failed refresh keeps the last good keys and logs a warning (never the keys). ``close``
    releases the key source (e.g. the Key Vault client's connections); :meth:`stop` calls it once.
    """

    def __init__(self, fetch: KeyFetcher, interval_s: float, description: str = "key source",
                 close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._fetch = fetch
        self._close = close
        self.interval_s = max(float(interval_s), 0.05)
        self.description = description
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread is not None:  # already started (main() starts it before the app)
            return
        self._set_keys(self._fetch())  # errors propagate: the server must not start without keys
        logger.info("loaded %d API key(s) from %s", self.key_count, self.description)
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="api-key-refresh", daemon=True)
        self._thread.start()

    def refresh(self) -> bool:
        """Re-read the keys now; True when they were replaced."""
        try:
            keys = self._fetch()
        except Exception as exc:  # noqa: BLE001 - any source failure keeps the last good keys (reported below)
            self.last_error = str(exc)
            logger.warning("could not refresh API keys (keeping the %d last good key(s)): %s", self.key_count, exc)
            return False
        if self.last_error is not None:
            logger.info("API keys readable again from %s", self.description)
        self.last_error = None
        self._set_keys(keys)
        return True

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def stop(self) -> None:
        """Stop refreshing, then release the key source (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        close, self._close = self._close, None
        if close is not None:
            close()


def generate_key() -> str:
    return "llm-" + secrets.token_urlsafe(24)


def announce_generated_key(key: str) -> None:
    """Print a generated key once, on stdout (deliberately not through logging)."""
    print(
        "\n"
        "No API key is configured, so this run generated one:\n"
        f"    {key}\n"
        "Send it as the X-API-Key header (or ?x_api_key=... on GET endpoints).\n"
        "Set CHAT_SERVER_API_KEY (or Azure Key Vault) to choose your own keys,\n"
        "or pass --open-access to serve without a key.\n",
        flush=True,
    )


def build_key_store(settings: ServerSettings, *, credential: Any | None = None) -> KeyStore:
    """Choose the key store for ``settings`` (not started yet: call ``start()``)."""
    if settings.open_access:
        logger.warning("open access: API keys are NOT checked (open_access / --open-access)")
        return OpenAccessKeyStore()
    if settings.uses_key_vault:
        from llm_server.api.plumbing.keyvault import KeyVaultKeySource

        assert settings.key_vault_url and settings.key_vault_secret_name
        source = KeyVaultKeySource(settings.key_vault_url, settings.key_vault_secret_name, credential)
        return RefreshingKeyStore(source.fetch, settings.key_refresh_interval_s, source.describe(), close=source.close)
    if settings.api_keys:
        return StaticKeyStore(settings.api_keys)
    key = generate_key()
    announce_generated_key(key)
    return StaticKeyStore([key])


# --- the FastAPI dependency ---------------------------------------------------------------
def presented_key(request: Request, allow_query: bool) -> str | None:
    """The key a request presents: X-API-Key, Authorization: Bearer, or (GET) ?x_api_key=."""
    header = request.headers.get("x-api-key")
    if header:
        return header.strip()
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_query and request.method in ("GET", "HEAD"):
        value = request.query_params.get(QUERY_KEY_PARAM)
        if value:
            return value.strip()
    return None


async def require_api_key(request: Request) -> None:
    """Router dependency: 401 (OpenAI-shaped JSON) unless the request carries a valid key."""
    store: KeyStore | None = getattr(request.app.state, "keys", None)
    settings: ServerSettings | None = getattr(request.app.state, "settings", None)
    if store is None:
        raise APIError(503, "server is starting", headers={"Retry-After": "1"})
    if store.open_access:
        return
    allow_query = settings.allow_query_api_key if settings is not None else False
    key = presented_key(request, allow_query)
    if key is None:
        query_ok = allow_query and request.method in ("GET", "HEAD")
        where = "the X-API-Key header" + (" or the x_api_key query parameter" if query_ok else "")
        raise APIError(
            401, f"missing API key: send it in {where}", code="missing_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="llm_server"'},
        )
    if not store.matches(key):
        raise APIError(
            401, "invalid API key", code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="llm_server"'},
        )


# --- log redaction ------------------------------------------------------------------------
_QUERY_KEY = re.compile(r"(?i)((?:x_)?api[_-]?key=)[^&\s\"']*")


def redact(text: str) -> str:
    """Replace query-string API keys (``x_api_key=...``) with ``***``."""
    return _QUERY_KEY.sub(r"\1***", text)


class RedactApiKeyFilter(logging.Filter):
    """Rewrites ``x_api_key=...`` in a record's message and arguments (uvicorn's access log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


_REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn")


def install_log_redaction() -> None:
    """Attach the redaction filter to uvicorn's loggers (idempotent)."""
    for name in _REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKeyFilter) for f in target.filters):
            target.addFilter(RedactApiKeyFilter())
