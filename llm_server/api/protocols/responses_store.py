"""Stored responses of the Responses API: a bounded, in-memory, least-recently-used store.

A response created with ``store: true`` (OpenAI's default) is kept with the conversation it
ends (its input, earlier turns included, and its output as chat messages), so a later request's
``previous_response_id`` continues it, and ``GET`` / ``DELETE /v1/responses/{id}`` find it.

- Bounded in count and in bytes (each entry's JSON size); the least recently used entry goes first.
- Scoped to the API key that created the response: entries are keyed by a SHA-256 digest of the
  key (never the key itself); another key's lookup finds nothing (the route answers 404).
- Nothing survives a restart (the store lives in the process's memory).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from llm_server.serving.request import Message

DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def owner_of(api_key: str | None) -> str:
    """The scope of a key's responses: a digest, so the store never holds a key."""
    return hashlib.sha256((api_key or "").encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Stored:
    """One stored response: its object as returned, and the conversation it ends."""

    response: dict[str, Any]
    conversation: tuple[Message, ...]
    size: int


class ResponseStore:
    """Thread-safe LRU map of (owner, response id) -> :class:`Stored`, bounded in count and bytes."""

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def put(self, owner: str, response: dict[str, Any], conversation: list[Message]) -> bool:
        """Keep ``response`` (and its conversation); False when it alone is above the byte bound."""
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        if size > self.max_bytes:
            return False
        key = (owner, str(response["id"]))
        with self._lock:
            self._drop(key)
            self._entries[key] = Stored(response, tuple(dict(m) for m in conversation), size)
            self._bytes += size
            while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return True

    def get(self, owner: str, response_id: str) -> Stored | None:
        """The stored response of ``owner`` (None: unknown, evicted or another key's); marks it used."""
        with self._lock:
            entry = self._entries.get((owner, response_id))
            if entry is not None:
                self._entries.move_to_end((owner, response_id))
            return entry

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            return self._drop((owner, response_id))

    def _drop(self, key: tuple[str, str]) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True
