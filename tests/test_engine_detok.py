"""The byte-table detokeniser gives exactly the text of the prefix-offset (``decode``) path."""

from __future__ import annotations

import random
from typing import Any

from llm_server.engine.detokenize import IncrementalDetokenizer, byte_table


class DecodeOnly:
    """The real tokenizer seen without its backend: the detokeniser must use ``decode``."""

    backend_tokenizer = None

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)


def deltas(tokenizer: Any, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_the_embedded_tokenizer_gets_a_byte_table(tokenizer: Any) -> None:
    table = byte_table(tokenizer)
    assert table is not None and len(table) == len(tokenizer)
    assert byte_table(DecodeOnly(tokenizer)) is None


def test_random_ids_stream_the_same_text_both_ways(tokenizer: Any) -> None:
    """Random ids (special tokens, bytes that are not valid UTF-8, split characters included)."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)] + list(tokenizer("é🤖漢")["input_ids"])
        fast, slow = deltas(tokenizer, ids), deltas(DecodeOnly(tokenizer), ids)
        assert "".join(fast) == "".join(slow) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_add_no_text(tokenizer: Any) -> None:
    ids = [tokenizer.eos_token_id, *tokenizer("Hi")["input_ids"], tokenizer.eos_token_id]
    assert "".join(deltas(tokenizer, ids)) == "Hi"
