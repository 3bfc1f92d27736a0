"""The Python API's prompt reuse (conversation_engine/prompt_reuse.py): an improvement pass starts
from the KV cache of the pass before when their prompts share a start, and its output is the
output it has without that (tiny random Llama, float32, greedy)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llm_server.conversation_engine import prompt_reuse
from llm_server.conversation_engine.improvement import improvement_pipeline
from llm_server.conversation_engine.outputs import make_generate_fn
from llm_server.conversation_engine.prompt_reuse import CACHE_FIELD, PromptReuse
from llm_server.engine.prefix_cache import common_length

PROMPTS = {"assistant": "You answer briefly.", "reviser": "You revise draft answers. " * 8}


class Spy:
    """``model.generate`` wrapped: the prompt ids and the length of the cache lent (None: none), per call."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[list[int], int | None]] = []
        generate = model.generate

        def spy(*args: Any, **kwargs: Any) -> Any:
            cache = kwargs.get(CACHE_FIELD)
            self.calls.append((kwargs["input_ids"][0].tolist(), None if cache is None else cache.get_seq_length()))
            return generate(*args, **kwargs)

        monkeypatch.setattr(model, "generate", spy)


def run(tokenizer: Any, model: Any) -> dict[str, str]:
    result: dict[str, str] = {}
    generate = make_generate_fn(tokenizer, model, max_new_tokens=12, do_sample=False)
    list(improvement_pipeline(generate, PROMPTS, [], "Why is the sky blue?", "assistant", result=result,
                              structured=True, gate="checks"))
    return result


def test_common_length() -> None:
    assert common_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_length([], [1]) == 0 and common_length([1, 2], [1, 2]) == 2


def test_later_passes_reuse_the_shared_opening_and_answer_the_same(
        tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt_reuse, "MIN_SHARED_TOKENS", 10**9)  # nothing reused
    plain = run(tokenizer, tiny_model)
    monkeypatch.setattr(prompt_reuse, "MIN_SHARED_TOKENS", 16)
    spy = Spy(tiny_model, monkeypatch)
    reused = run(tokenizer, tiny_model)
    assert reused == plain
    draft, review, revision = spy.calls[:3]
    assert draft[1] is None and review[1] is None  # different system prompts: nothing in common
    assert revision[1] == common_length(review[0], revision[0]) >= 16  # the review's opening, exactly


def test_a_cache_that_cannot_be_cropped_is_not_kept() -> None:
    reuse = PromptReuse()
    reuse.keep(list(range(40)), {CACHE_FIELD: object()})
    assert reuse.lend(list(range(50))) is None


def test_a_callers_own_cache_argument_is_passed_as_given(
        tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache argument from the caller is theirs: none is lent beside it (that would be a doubled
    keyword), and the passes still run."""
    spy = Spy(tiny_model, monkeypatch)
    generate = make_generate_fn(tokenizer, tiny_model, max_new_tokens=4, do_sample=False, **{CACHE_FIELD: None})
    messages = [{"role": "system", "content": PROMPTS["reviser"]}, {"role": "user", "content": "One."}]
    first: Iterator[str] = generate(messages)
    assert "".join(first)
    assert "".join(generate([*messages[:1], {"role": "user", "content": "One. Two."}]))
    assert [lent for _, lent in spy.calls] == [None, None]


def test_a_caller_asking_for_return_dict_in_generate_still_gets_reuse(
        tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``return_dict_in_generate`` among the caller's settings is the one reuse needs too: not doubled."""
    spy = Spy(tiny_model, monkeypatch)
    generate = make_generate_fn(tokenizer, tiny_model, max_new_tokens=4, do_sample=False,
                                return_dict_in_generate=True)
    messages = [{"role": "system", "content": PROMPTS["reviser"]}, {"role": "user", "content": "One."}]
    assert "".join(generate(messages))
    second = [*messages[:1], {"role": "user", "content": "One. Two."}]
    assert "".join(generate(second))
    assert spy.calls[1][1] == common_length(spy.calls[0][0], spy.calls[1][0])
