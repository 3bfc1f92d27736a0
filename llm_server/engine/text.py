"""Token ids -> text deltas: UTF-8-safe incremental detokenisation and stop-string handling.

``IncrementalDetokenizer`` uses the prefix-offset scheme: each new token is decoded together
with the few tokens before it and only the new suffix is emitted, so a word-initial space is
never lost and a multi-byte character split across tokens is held back until complete (a
trailing U+FFFD means "incomplete"). ``StopMatcher`` holds back text that might be the start
of a stop string until it is resolved, and cuts the text at the first stop string.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end is emitted as is)."""
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
