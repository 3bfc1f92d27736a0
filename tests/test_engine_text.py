"""Incremental detokenisation and stop strings, with the embedded model's real tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from llm_server.engine.detokenize import IncrementalDetokenizer, StopMatcher

SAMPLES = [
    "Hello world, how are you today?",
    "Ünïcödé: naïve café — déjà vu; Ελληνικά and русский текст.",
    "Emoji 🤖🚀👩‍👩‍👧 and CJK 漢字かなカナ한국어 mixed  with  double spaces.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\tindented 🎉",
]


def stream_text(tokenizer: Any, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_rebuild_the_text_without_broken_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = stream_text(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_split_over_tokens_is_held_back(tokenizer: Any) -> None:
    ids = tokenizer("🤖", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "an emoji is several byte-level tokens"
    deltas = stream_text(tokenizer, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and "".join(deltas) == "🤖"


def test_special_tokens_are_not_part_of_the_text(tokenizer: Any) -> None:
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert "".join(stream_text(tokenizer, ids)) == "Hi"


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out: list[str] = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_cuts_the_text_and_partial_matches_are_held_back() -> None:
    out, stopped = feed_all(StopMatcher(("STOP",)), ["abc S", "T", "OP tail"])
    assert stopped and out == ["abc ", "", ""]


def test_partial_match_that_does_not_complete_is_released() -> None:
    out, stopped = feed_all(StopMatcher(("STOP",)), ["abc ST", "xyz", " end"])
    assert not stopped and out == ["abc ", "STxyz", " end", ""]


def test_held_back_text_is_flushed_at_the_end() -> None:
    out, stopped = feed_all(StopMatcher(("</s>",)), ["answer </"])
    assert not stopped and "".join(out) == "answer </" and out[0] == "answer "


def test_earliest_of_several_stop_strings_wins() -> None:
    out, stopped = feed_all(StopMatcher(("world", "lo w")), ["hello world"])
    assert stopped and out == ["hel"]


def test_no_stop_strings_passes_text_through() -> None:
    assert StopMatcher(()).feed("anything") == ("anything", False)
