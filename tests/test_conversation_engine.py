"""Inputs, streaming generation and ConversationEngine on the tiny seeded Llama (fast, no download)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_server.conversation_engine.conversation_engine import ConversationEngine
from llm_server.conversation_engine.improvement import RESULT_KEYS, STAGE_HEADINGS
from llm_server.conversation_engine.improvement_gate import JUDGE_MAX_NEW_TOKENS
from llm_server.conversation_engine.inputs import build_review_prompt, prepare_inputs
from llm_server.conversation_engine.outputs import (
    generate_reply,
    generation_parameters,
    stream_and_improve_reply,
    stream_and_improve_reply_with_steps,
    stream_generate,
    stream_reply,
)
from tests.conftest import write_model_config

PROMPTS = {"assistant": "You are helpful.", "reviser": "You revise drafts.", "pirate": "Talk like a pirate."}


@pytest.fixture(autouse=True)
def greedy_short(small_config: Path) -> Path:
    """Every test here generates greedily with at most 8 new tokens (temporary config folder)."""
    return small_config


class ForwardSpy:
    """Counts (and optionally fails) forward calls of a model, restoring it afterwards."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.original = model.forward
        monkeypatch.setattr(model, "forward", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("forward exploded")
        return self.original(*args, **kwargs)


# --------------------------------------------------------------------------- inputs


def test_prepare_inputs_applies_the_chat_template_once(tokenizer: Any, tiny_model: Any) -> None:
    history = [{"role": "user", "content": "Explain recursion"}, {"role": "assistant", "content": "A function..."}]
    inputs = prepare_inputs(tokenizer, tiny_model, PROMPTS, "Can you give an example?", conversation_history=history)
    assert set(inputs) == {"input_ids", "attention_mask"}
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and ids.device == tiny_model.device
    assert inputs["attention_mask"].shape == ids.shape and bool(inputs["attention_mask"].all())
    text = tokenizer.decode(ids[0])
    assert text == tokenizer.apply_chat_template(
        [{"role": "system", "content": PROMPTS["assistant"]}, *history,
         {"role": "user", "content": "Can you give an example?"}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert ids[0, 0].item() == tokenizer.bos_token_id and ids[0, 1].item() != tokenizer.bos_token_id
    assert text.endswith("<|im_start|>assistant\n")


def test_prepare_inputs_role_and_plain_string_prompts(tokenizer: Any, tiny_model: Any) -> None:
    pirate = tokenizer.decode(prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi", role="pirate")["input_ids"][0])
    assert "Talk like a pirate." in pirate and "You are helpful." not in pirate
    plain = tokenizer.decode(prepare_inputs(tokenizer, tiny_model, "Be terse.", "hi")["input_ids"][0])
    assert plain.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    with pytest.raises(ValueError, match="unknown role"):
        prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi", role="nobody")


def test_malformed_history_is_rejected(tokenizer: Any, tiny_model: Any) -> None:
    with pytest.raises(ValueError, match=r"conversation_history\[0\]"):
        prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi", conversation_history=[{"content": "no role"}])


def test_review_prompt_contains_question_draft_and_format() -> None:
    prompt = build_review_prompt("Why?", "Because.")
    assert "Why?" in prompt and "Because." in prompt
    assert prompt.index("Suggestions:") < prompt.index("Revised answer:") < prompt.index("Comments:")


# --------------------------------------------------------------------------- outputs


def test_generation_parameters_come_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_model_config(tmp_path / "cfg", max_new_tokens=33, temperature=0.5, top_p=0.8, do_sample=True,
                                repetition_penalty=1.2)  # fmt: skip
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(folder))
    params = generation_parameters()
    assert {k: params[k] for k in ("max_new_tokens", "temperature", "top_p", "do_sample", "repetition_penalty")} == {
        "max_new_tokens": 33, "temperature": 0.5, "top_p": 0.8, "do_sample": True, "repetition_penalty": 1.2}
    assert generation_parameters(max_new_tokens=5, temperature=None)["max_new_tokens"] == 5
    greedy = generation_parameters(do_sample=False)
    assert "temperature" not in greedy and "top_p" not in greedy


def test_model_generate_receives_the_config_parameters(
    tokenizer: Any, tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_model_config(tmp_path / "cfg", max_new_tokens=3, do_sample=True, temperature=0.4,
                                repetition_penalty=1.3)  # fmt: skip
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(folder))
    seen = _spy_generate(tiny_model, monkeypatch)
    list(stream_reply(tokenizer, tiny_model, PROMPTS, "hi"))
    assert (seen["max_new_tokens"], seen["temperature"], seen["repetition_penalty"]) == (3, 0.4, 1.3)
    assert seen["do_sample"] is True


def test_other_generate_keywords_in_the_config_pass_through(
    tokenizer: Any, tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_model_config(tmp_path / "cfg", max_new_tokens=6, no_repeat_ngram_size=2, min_new_tokens=6)
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(folder))
    seen = _spy_generate(tiny_model, monkeypatch)
    assert list(stream_reply(tokenizer, tiny_model, PROMPTS, "hi"))  # generate accepted them
    assert seen["no_repeat_ngram_size"] == 2 and seen["min_new_tokens"] == 6


def test_conversation_engine_reads_the_config_once(
    tokenizer: Any, tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_model_config(tmp_path / "cfg", max_new_tokens=3, do_sample=False)
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(folder))
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS, improvement=True)
    write_model_config(folder, max_new_tokens=5, do_sample=False)  # edited after the engine was built
    seen = _spy_generate(tiny_model, monkeypatch)
    engine.reply("hi")
    budgets = [call["max_new_tokens"] for call in seen["calls"]]
    # draft, review and revision at the configured budget (greedy, as configured: stage 1 kept the draft, so
    # stage 2 would repeat it and is not run); a judgement pass has its own short cap
    assert budgets.count(3) == 3 and set(budgets) <= {3, JUDGE_MAX_NEW_TOKENS}
    assert "Review 2 was not run" in engine.last_result["comments2"]


def _spy_generate(model: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record the keyword arguments of ``model.generate`` (the last call's, and every call's)."""
    seen: dict[str, Any] = {"calls": []}
    original = model.generate

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        seen["calls"].append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_stream_generate_matches_blocking_generation(tokenizer: Any, tiny_model: Any) -> None:
    inputs = prepare_inputs(tokenizer, tiny_model, PROMPTS, "Write a poem")
    chunks = list(stream_generate(inputs, tokenizer, tiny_model, max_new_tokens=8))
    assert chunks and all(chunks)
    assert "".join(chunks) == generate_reply(inputs, tokenizer, tiny_model, max_new_tokens=8)
    with torch.inference_mode():
        output = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[-1] == inputs["input_ids"].shape[-1] + 8  # the spec's direct model.generate use


def test_generation_errors_reach_the_consumer(
    tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ForwardSpy(tiny_model, monkeypatch, fail_at=3)
    inputs = prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi")
    with pytest.raises(RuntimeError, match="forward exploded"):
        list(stream_generate(inputs, tokenizer, tiny_model, max_new_tokens=8))


def test_invalid_generation_arguments_reach_the_consumer(tokenizer: Any, tiny_model: Any) -> None:
    inputs = prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi")
    with pytest.raises(ValueError):
        list(stream_generate(inputs, tokenizer, tiny_model, max_new_tokens=4, num_beams=2))  # no beams with a streamer


def test_abandoning_the_stream_stops_generation(
    tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ForwardSpy(tiny_model, monkeypatch)
    inputs = prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi")
    stream = stream_generate(inputs, tokenizer, tiny_model, max_new_tokens=400, min_new_tokens=400)
    next(stream)
    stream.close()  # joins the worker after setting the stop flag
    calls_after_close = spy.calls
    assert calls_after_close < 400
    assert not [t for t in threading.enumerate() if t.name == "llm-generate"]
    assert spy.calls == calls_after_close


def test_stream_reply_fills_result(tokenizer: Any, tiny_model: Any) -> None:
    result = {"stale": "x"}
    streamed = "".join(stream_reply(tokenizer, tiny_model, PROMPTS, "hi", result=result))
    assert result == {"reply": streamed.strip()}


def test_improvement_functions_stream_final_or_stages(tokenizer: Any, tiny_model: Any) -> None:
    result: dict[str, str] = {}
    final = "".join(stream_and_improve_reply(tokenizer, tiny_model, PROMPTS, "hi", result=result))
    assert set(result) == set(RESULT_KEYS) and final == result["reply"] == result["revision2"]
    steps = "".join(stream_and_improve_reply_with_steps(tokenizer, tiny_model, PROMPTS, "hi", result=result))
    assert [h for h in STAGE_HEADINGS if h in steps] == list(STAGE_HEADINGS)


# --------------------------------------------------------------------------- ConversationEngine


def test_plain_turn_updates_history_and_last_result(tokenizer: Any, tiny_model: Any) -> None:
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS)
    streamed = "".join(engine.stream_reply("Hello, how are you today?"))
    assert streamed and engine.last_result == {"reply": streamed.strip()}
    assert engine.conversation_history == [
        {"role": "user", "content": "Hello, how are you today?"},
        {"role": "assistant", "content": streamed.strip()},
    ]
    assert engine.reply("And now?") == engine.last_result["reply"]
    assert len(engine.conversation_history) == 4


def test_history_set_by_the_user_is_used_and_not_mutated(
    tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[str] = []
    original = tiny_model.generate

    def spy(**kwargs: Any) -> Any:
        prompts.append(tokenizer.decode(kwargs["input_ids"][0]))
        return original(**kwargs)

    monkeypatch.setattr(tiny_model, "generate", spy)
    given = [{"role": "user", "content": "My name is Alice"}, {"role": "assistant", "content": "Hi Alice!"}]
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS)
    engine.conversation_history = given
    engine.reply("What's my name?")
    assert "My name is Alice" in prompts[0] and "Hi Alice!" in prompts[0]
    assert len(engine.conversation_history) == 4 and len(given) == 2


def test_failed_turn_leaves_history_unchanged_and_no_stale_result(
    tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS)
    engine.reply("first")
    before = list(engine.conversation_history)
    ForwardSpy(tiny_model, monkeypatch, fail_at=1)
    with pytest.raises(RuntimeError, match="forward exploded"):
        for _ in engine.stream_reply("second"):
            pass
    assert engine.conversation_history == before
    assert "reply" not in engine.last_result


def test_abandoned_turn_leaves_history_unchanged(tokenizer: Any, tiny_model: Any) -> None:
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS)
    stream = engine.stream_reply("hello", max_new_tokens=50, min_new_tokens=50)
    next(stream)
    stream.close()
    assert engine.conversation_history == []


def test_last_result_is_cleared_when_a_turn_starts(tokenizer: Any, tiny_model: Any) -> None:
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS)
    engine.reply("first")
    first = engine.last_result["reply"]
    stream = engine.stream_reply("second")
    assert engine.last_result == {}
    streamed = "".join(stream)
    assert engine.last_result["reply"] == streamed.strip()  # the reply is the streamed text, trimmed
    assert engine.conversation_history[-1] == {"role": "assistant", "content": streamed.strip()}
    assert engine.conversation_history[1] == {"role": "assistant", "content": first}


def test_improvement_turn_with_intermediate_steps(tokenizer: Any, tiny_model: Any) -> None:
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS)
    assert engine.set_improvement(True).set_intermediate_steps(True) is engine
    streamed = "".join(engine.stream_reply("How does machine learning work?"))
    assert [streamed.index(h) for h in STAGE_HEADINGS] == sorted(streamed.index(h) for h in STAGE_HEADINGS)
    result = engine.last_result
    assert set(result) == set(RESULT_KEYS)
    assert result["reply"] == result["revision2"] and result["revision2"].strip().lower() != "none"
    assert engine.conversation_history[-1] == {"role": "assistant", "content": result["reply"]}
    assert streamed.endswith(f"### Final answer\n\n{result['reply']}\n\n")


def test_improvement_without_steps_streams_only_the_final_answer(tokenizer: Any, tiny_model: Any) -> None:
    engine = ConversationEngine(tokenizer, tiny_model, PROMPTS, improvement=True)
    chunks: Iterator[str] = engine.stream_reply("Explain quantum computing")
    streamed = "".join(chunks)
    assert streamed == engine.last_result["reply"]
    assert not any(h in streamed for h in STAGE_HEADINGS)
    engine.set_improvement(False)
    engine.reply("plain again")
    assert set(engine.last_result) == {"reply"}


def test_a_failing_decoder_does_not_hang_the_stream(
    tokenizer: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = prepare_inputs(tokenizer, tiny_model, PROMPTS, "hi")

    def broken_decode(*args: Any, **kwargs: Any) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken tokenizer")

    monkeypatch.setattr(tokenizer, "decode", broken_decode)
    with pytest.raises(UnicodeDecodeError):
        list(stream_generate(inputs, tokenizer, tiny_model, max_new_tokens=4))


def test_tokenizers_without_chat_template_get_a_plain_transcript(tokenizer: Any, tiny_model: Any) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    text = plain.decode(prepare_inputs(plain, tiny_model, "Be terse.", "hi")["input_ids"][0])
    assert text.endswith("System: Be terse.\n\nUser: hi\n\nAssistant:")
    assert "<|im_start|>" not in text
