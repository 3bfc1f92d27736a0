"""The prompt's log-probabilities (``echo`` with ``logprobs`` on /v1/completions), as
lm-evaluation-harness's ``local-completions`` reads them.

- every runner's ``prompt_logits`` (LlamaRunner, GenericRunner, HFRunner, and the base class's
  token-by-token default) equals the model's own ``model(input_ids).logits`` at every position, and
  leaves the cache of a sequence running beside it untouched (tiny fp32 models);
- over HTTP: ``echo: true, logprobs: 1, max_tokens: 1`` returns the prompt's tokens then the
  generated one; the first log-probability is null, each next one is ``log_softmax`` of the model's
  logits at the position before, and each ``top_logprobs`` entry is that position's likeliest token;
  streamed, the echo chunk carries the same numbers; best_of and n keep working with it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.generic_runner import GenericRunner
from llm_server.engine.hf_runner import HFRunner
from llm_server.engine.llama_runner import LlamaRunner
from llm_server.engine.prompt_logprobs import prompt_logprobs
from llm_server.engine.runner import ModelRunner
from tests.openai_harness import API_KEY, build_app, live_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tiny_models  # noqa: E402

MODEL = "tiny"
PROMPT = "The capital of France is Paris, and the capital of Italy is"
IDS = [5, 17, 9, 33, 2, 8, 41, 41, 7, 19, 3, 60]


def _reference(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def _runners() -> Iterator[tuple[str, Any, ModelRunner]]:
    llama = tiny_models.build("llama")
    yield "LlamaRunner", llama, LlamaRunner(llama, max_slots=2, max_context=64, pack_weights=True)
    yield "HFRunner", llama, HFRunner(llama)
    qwen = tiny_models.build("qwen2")
    reference = tiny_models.build("qwen2")  # GenericRunner re-lays the weights of the model it serves
    yield "GenericRunner", reference, GenericRunner(qwen, max_slots=2, max_context=64)


@pytest.mark.parametrize("default", [False, True])
def test_each_runner_scores_every_prompt_position_as_the_model_does(default: bool) -> None:
    for name, model, runner in _runners():
        expected = _reference(model, IDS)
        beside = runner.open()
        before = runner.forward([beside], [[4, 5, 6]])  # a running sequence's cache
        with torch.no_grad():
            logits = ModelRunner.prompt_logits(runner, IDS) if default else runner.prompt_logits(IDS)
        assert logits.shape == (len(IDS), runner.vocab_size), name
        torch.testing.assert_close(torch.log_softmax(logits, -1), expected, atol=1e-4, rtol=1e-4, msg=name)
        items = prompt_logprobs(runner, IDS, top=2)
        assert items[0].logprob is None and items[0].top == ()
        for p, item in enumerate(items[1:]):
            assert item.token_id == IDS[p + 1]
            assert item.logprob == pytest.approx(float(expected[p, IDS[p + 1]]), abs=1e-4)
            assert [i for i, _ in item.top] == expected[p].topk(2).indices.tolist()
        after = runner.forward([beside], [[7]])  # the running sequence goes on as if nothing ran
        again = runner.open()
        runner.forward([again], [[4, 5, 6]])
        torch.testing.assert_close(after, runner.forward([again], [[7]]), msg=name)
        assert before.shape == (1, runner.vocab_size)
        runner.release(beside)
        runner.release(again)


@pytest.fixture(scope="module")
def url(tokenizer: Any, tiny_model: Any) -> Iterator[str]:
    engine = BatchEngine(tokenizer, tiny_model, MODEL, EngineConfig(max_running=4, max_total_tokens=4096))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]
        yield base


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def test_echo_with_logprobs_returns_the_prompts_logprobs(url: str, tokenizer: Any, tiny_model: Any) -> None:
    ids = list(tokenizer(PROMPT)["input_ids"])
    expected = _reference(tiny_model, ids)
    reply = api(url).completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1,
                                        temperature=0, extra_body={"repetition_penalty": 1.0})
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(logprobs.tokens) == len(ids) + 1
    assert logprobs.tokens[: len(ids)] == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None
    for p in range(1, len(ids)):
        assert logprobs.token_logprobs[p] == pytest.approx(float(expected[p - 1, ids[p]]), abs=1e-3)
        best = int(expected[p - 1].argmax())
        assert logprobs.top_logprobs[p] == {tokenizer.decode([best]): pytest.approx(float(expected[p - 1, best]),
                                                                                   abs=1e-3)}
    generated = int(expected[-1].argmax())  # greedy, no penalty: the likeliest next token, with its logprob
    assert logprobs.tokens[-1] == tokenizer.decode([generated])
    assert logprobs.token_logprobs[-1] == pytest.approx(float(expected[-1, generated]), abs=1e-3)
    assert logprobs.text_offset[: 2] == [0, len(logprobs.tokens[0])]
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 1

    chunks = list(api(url).completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1,
                                              temperature=0, stream=True))
    echoed = chunks[0].choices[0]
    assert echoed.text == PROMPT and echoed.logprobs.token_logprobs == logprobs.token_logprobs[: len(ids)]


def test_echo_logprobs_with_n_and_best_of(url: str) -> None:
    fields: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 3}
    whole = api(url).completions.create(**fields, temperature=0)
    prompt_part = whole.choices[0].logprobs.token_logprobs[:-3]
    several = api(url).completions.create(**fields, n=2, best_of=3, temperature=1.0, seed=4)
    assert len(several.choices) == 2
    for choice in several.choices:
        assert choice.logprobs.token_logprobs[: len(prompt_part)] == prompt_part
        assert choice.text.startswith(PROMPT)
    without = api(url).completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=2, temperature=0)
    assert without.choices[0].logprobs is None  # echo alone: no log-probabilities
