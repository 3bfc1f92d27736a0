"""Prefix affinity, the proxy's half: a session key for every chat request, from its body.

A replica's prefix cache only helps the turns that reach it, so the next turn of a conversation
should go where the last one went. The session key names the conversation:

- the client's own ``x-session-id`` header (:data:`SESSION_HEADER`, Serve's session header), if
  sent: it wins, and this module leaves the request alone;
- else a hash of the conversation's opening, which every turn repeats: the system text and the
  first user message of a chat body (``messages`` of ``/v1/chat/completions`` and ``/v1/messages``
  with its ``system``; ``instructions`` + ``input`` of ``/v1/responses``; ``role`` + the first
  user message of ``history``, else ``prompt``, of the spec's ``/chat/blocking`` and
  ``/chat/stream``, POST body or GET query). Two conversations with the same opening share a key:
  they also share a cached prefix.

:class:`SessionKeyMiddleware` wraps Serve's HTTP proxy (see :mod:`.proxy_errors`): it reads the
body (up to :data:`MAX_BUFFERED_BYTES`), adds ``x-session-id: prefix-<hash>`` to the request's
headers, and hands the proxy the same body. Serve puts that header into the request's metadata,
where :class:`~.affinity_router.PrefixAffinityRouter` reads it. Requests without an opening
(other paths, ``previous_response_id`` chains, bodies that are not JSON) get no key: the router
routes them by load alone. Nothing here validates a body; the replica does that.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

#: The session header: Serve's own (``RAY_SERVE_SESSION_ID_HEADER_KEY``, default ``x-session-id``).
try:
    from ray.serve._private.constants import SERVE_SESSION_ID as SESSION_HEADER
except ImportError:  # pragma: no cover - Ray moved it: its documented default
    SESSION_HEADER = "x-session-id"
#: Prefix of the keys derived here (a client's own session ids are used as sent).
DERIVED_PREFIX = "prefix-"
#: Paths (after the route prefix) whose bodies open a conversation.
CHAT_PATHS = ("/chat/blocking", "/chat/stream", "/v1/chat/completions", "/v1/messages", "/v1/responses")
#: A body larger than this is passed on unread (no key; the replica's own limit still applies).
MAX_BUFFERED_BYTES = 4 * 1024 * 1024


def _text(value: Any) -> str:
    """The text of a message's content: a string, or the ``text`` of each part."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(part["text"] for part in value if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _opening_of_messages(messages: list[Any]) -> list[str]:
    """The leading system / developer texts and the first user message of a message list."""
    opening: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            return opening
        role = message.get("role", "user")
        if role in ("system", "developer"):
            opening.append(f"{role}:{_text(message.get('content'))}")
        elif role == "user":
            return [*opening, f"user:{_text(message.get('content'))}"]
    return opening


def _opening_of_spec_chat(body: dict[str, Any]) -> list[str]:
    history = body["history"] if isinstance(body.get("history"), list) else []
    first = _opening_of_messages([m for m in history if isinstance(m, dict) and m.get("role") == "user"][:1])
    prompt = body.get("prompt")
    return [f"role:{body.get('role', 'assistant')}", *(first or [f"user:{_text(prompt)}"])]


def conversation_opening(body: Any) -> list[str] | None:
    """What every turn of ``body``'s conversation repeats (see the module docstring), or None."""
    if not isinstance(body, dict):
        return None
    opening: list[str] = []
    for field in ("system", "instructions"):  # Messages API; Responses API
        if body.get(field):
            opening.append(f"system:{_text(body[field])}")
    if isinstance(body.get("messages"), list):
        opening += _opening_of_messages(body["messages"])
    elif "input" in body:
        if body.get("previous_response_id"):
            return None  # the opening is on the replica that stored it: only a session header can help
        chat = body["input"]
        if isinstance(chat, str):
            opening.append(f"user:{chat}")
        elif isinstance(chat, list):
            opening += _opening_of_messages(chat)
    elif isinstance(body.get("prompt"), str):
        opening += _opening_of_spec_chat(body)
    return opening or None


def session_key(body: Any) -> str | None:
    """``prefix-<hash of the opening>``, or None when ``body`` opens no conversation."""
    opening = conversation_opening(body)
    if opening is None:
        return None
    digest = hashlib.sha256(json.dumps(opening, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
    return DERIVED_PREFIX + digest[:32]


def _names_session(name: bytes) -> bool:
    """Serve's rule: case-insensitive, ``-`` and ``_`` alike."""
    return name.decode("latin-1").lower().replace("-", "_") == SESSION_HEADER.lower().replace("-", "_")


def _query_body(scope: Scope) -> dict[str, Any]:
    """A GET's query as the body it stands for (``history`` is JSON in the query)."""
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
    if "history" in query:
        try:
            query["history"] = json.loads(query["history"])
        except ValueError:
            query["history"] = []
    return query


async def _buffer(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The body's messages as received, and the whole body (None when over ``limit`` or cut off)."""
    messages: list[Message] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        body += message.get("body", b"")
        if len(body) > limit:
            return messages, None
        if not message.get("more_body", False):
            return messages, body


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class SessionKeyMiddleware:
    """Adds the session header to chat requests that lack one (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_buffered_bytes: int = MAX_BUFFERED_BYTES) -> None:
        self.app = app
        self.max_buffered_bytes = max_buffered_bytes

    def _wants_key(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("method") not in ("GET", "POST"):
            return False
        if not str(scope.get("path", "")).rstrip("/").endswith(CHAT_PATHS):
            return False
        return not any(_names_session(name) for name, _ in scope.get("headers", []))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._wants_key(scope):
            await self.app(scope, receive, send)
            return
        body: Any = None
        if scope["method"] == "GET":
            body = _query_body(scope)
        else:
            messages, raw = await _buffer(receive, self.max_buffered_bytes)
            receive = _replay(messages, receive)
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, RecursionError):
                body = None  # the replica answers it with its own 400
        key = session_key(body)
        if key is not None:
            scope = {**scope, "headers": [*scope.get("headers", []), (SESSION_HEADER.encode("latin-1"), key.encode())]}
        await self.app(scope, receive, send)
