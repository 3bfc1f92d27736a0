"""Token ids -> text deltas: UTF-8-safe incremental detokenisation and stop-string handling.

``IncrementalDetokenizer`` uses the prefix-offset scheme: each new token is decoded together
with the few tokens before it and only the new suffix is emitted, so a word-initial space is
never lost and a multi-byte character split across tokens is held back until complete (a
trailing U+FFFD means "incomplete"). That costs two ``decode`` calls per token per sequence
(~8 us on the 2-core EPYC), on the scheduler thread. For byte-level BPE tokenizers (GPT-2 style:
SmolLM2, Llama 3, Qwen2), whose decoding is just "concatenate each token's bytes, then UTF-8",
it instead looks each id's bytes up in a table built once per tokenizer and feeds them to an
incremental UTF-8 decoder (~1 us per token, the same text: the table is checked against
``decode`` when it is built, and any other tokenizer keeps the prefix-offset path).

``StopMatcher`` holds back text that might be the start of a stop string until it is resolved,
and cuts the text at the first stop string.
"""

from __future__ import annotations

import codecs
import threading
from typing import Any

_REPLACEMENT = "\ufffd"
_TABLES: dict[int, tuple[Any, list[bytes] | None]] = {}  # id(tokenizer) -> (tokenizer, its byte table)
_TABLES_LOCK = threading.Lock()


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _build_byte_table(tokenizer: Any) -> list[bytes] | None:
    """Each id's bytes (b"" for special tokens, skipped) when decoding is plain byte-level; else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel" or getattr(
        tokenizer, "clean_up_tokenization_spaces", True
    ):
        return None
    chars = _byte_level_chars()
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    table: list[bytes] = []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index in special or token is None:
            table.append(b"")
        elif all(c in chars for c in token):
            table.append(bytes(chars[c] for c in token))
        else:  # an added token: its text as is
            table.append(token.encode("utf-8"))
    return table if _agrees_with_decode(tokenizer, table) else None


def _agrees_with_decode(tokenizer: Any, table: list[bytes]) -> bool:
    """Whether the table decodes like ``tokenizer.decode`` on a spread of ids and a pair of them."""
    step = max(1, len(table) // 256)
    samples = [[i] for i in range(0, len(table), step)] + [[i, i + 1] for i in range(0, len(table) - 1, step * 7)]
    return all(
        b"".join(table[i] for i in ids).decode("utf-8", "replace") == tokenizer.decode(ids, skip_special_tokens=True)
        for ids in samples
    )


def byte_table(tokenizer: Any) -> list[bytes] | None:
    """The tokenizer's id -> bytes table (built once, thread-safe), or None: use ``decode``."""
    with _TABLES_LOCK:
        cached = _TABLES.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            cached = (tokenizer, _build_byte_table(tokenizer))
            _TABLES[id(tokenizer)] = cached
        return cached[1]


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._table = byte_table(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly empty)."""
        if self._table is not None:
            return str(self._utf8.decode(self._table[token_id] if 0 <= token_id < len(self._table) else b""))
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end is emitted as is)."""
        if self._table is not None:
            return str(self._utf8.decode(b"", final=True))
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Cuts generated text at the first stop string, holding back possible partial matches."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buffer[:cut], True
        hold = self._partial_match_length(buffer)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[-k:]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """Text held back at the end of generation (it never became a stop string)."""
        pending, self._pending = self._pending, ""
        return pending
