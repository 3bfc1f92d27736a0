"""GenericRunner inside the BatchEngine: staggered requests, cancellation, grammar masks, the runner's reason.

Tiny random models of non-Llama families with the embedded tokenizer's vocabulary (plus padding
rows, as Qwen and Gemma checkpoints have: the model's vocabulary larger than the tokenizer's).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tiny_models  # noqa: E402

from llm_server.engine.batch_engine import BatchEngine  # noqa: E402
from llm_server.engine.constraints import compiler_for  # noqa: E402
from llm_server.engine.model_setup import RUNNER_ATTR, make_runner  # noqa: E402
from llm_server.engine.types import Finished, GenerationRequest, SamplingParams  # noqa: E402
from tests.test_engine_batching import (  # noqa: E402
    PROMPTS,
    consume,
    encode,
    generate_ids,
    greedy,
    request,
    run_staggered,
    running_engine,
)
from tests.test_structured_engine import SCHEMA  # noqa: E402

EXTRA_VOCAB = 64  # model rows beyond the tokenizer's ids


def family_model(tokenizer: Any, family: str) -> Any:
    reason = tiny_models.available(family)
    if reason is not None:
        pytest.skip(f"{family}: {reason}")
    model = tiny_models.build(family, vocab_size=len(tokenizer) + EXTRA_VOCAB)
    model.generation_config.eos_token_id = 2
    return model


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe"])
def test_staggered_requests_equal_generate_and_the_reason_is_exposed(tokenizer: Any, family: str) -> None:
    model = family_model(tokenizer, family)
    prompts = [encode(tokenizer, p) for p in PROMPTS[:4]]
    budgets = [20, 12, 16, 10]
    expected = [generate_ids(model, p, n) for p, n in zip(prompts, budgets, strict=True)]
    with running_engine(tokenizer, model, max_running=4) as engine:
        assert engine.runner_name == "GenericRunner"
        assert "attention interface" in engine.runner_reason
        results = run_staggered(engine, [request(f"r{i}", p, greedy(n)) for i, (p, n) in
                                         enumerate(zip(prompts, budgets, strict=True))])
    for reference, (_, finished) in zip(expected, results, strict=True):
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)
        assert finished.completion_tokens == len(reference)


def test_a_request_cancelled_mid_batch_leaves_the_others_intact(tokenizer: Any) -> None:
    model = family_model(tokenizer, "gemma2")
    prompts = [encode(tokenizer, p) for p in PROMPTS[:3]]
    expected = [generate_ids(model, p, 24) for p in prompts]

    async def scenario(engine: BatchEngine) -> list[tuple[list[str], Finished]]:
        streams = [engine.submit(request(f"r{i}", p, greedy(24))) for i, p in enumerate(prompts)]
        victim = engine.submit(request("victim", encode(tokenizer, PROMPTS[4]), greedy(200)))
        started = asyncio.Event()
        task = asyncio.create_task(consume(victim, started, after=3))
        await started.wait()
        victim.cancel()
        _, cancelled = await task
        assert cancelled.reason == "cancelled"
        return list(await asyncio.gather(*(consume(s) for s in streams)))

    with running_engine(tokenizer, model, max_running=4) as engine:
        results = asyncio.run(scenario(engine))
        assert engine.stats().healthy
    for reference, (_, finished) in zip(expected, results, strict=True):
        assert finished.text == tokenizer.decode(reference, skip_special_tokens=True)


def test_grammar_masks_work_with_a_model_vocabulary_larger_than_the_tokenizer(tokenizer: Any) -> None:
    model = family_model(tokenizer, "qwen3")
    grammar = compiler_for(tokenizer).json_schema(SCHEMA)
    with running_engine(tokenizer, model, max_running=4) as engine:
        assert engine.runner_name == "GenericRunner"
        params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, constraint=grammar)
        finished = engine.submit(GenerationRequest("c", encode(tokenizer, PROMPTS[0]), params)).result()
    value = json.loads(finished.text)
    assert set(value) == {"answer", "colour", "count"}


def test_the_runner_can_be_chosen_on_the_model(tokenizer: Any) -> None:
    model = tiny_models.build("llama")
    setattr(model, RUNNER_ATTR, "generic")
    assert type(make_runner(model, 2, 64)).__name__ == "GenericRunner"
    setattr(model, RUNNER_ATTR, "hf")
    runner = make_runner(model, 2, 64)
    assert type(runner).__name__ == "HFRunner" and "'hf' was asked for" in runner.reason
    setattr(model, RUNNER_ATTR, "fastest")
    with pytest.raises(ValueError, match="unknown runner 'fastest'"):
        make_runner(model, 2, 64)


def test_a_model_the_probe_rejects_falls_back_with_its_reason() -> None:
    """A model whose layers attend elsewhere than the attention interface: the probe catches it."""
    model = tiny_models.build("qwen3")

    for layer in model.model.layers:  # ignore the configured implementation, as an old model might
        layer.self_attn.config = type(model.config)(**model.config.to_dict())
        layer.self_attn.config._attn_implementation = "sdpa"
    runner = make_runner(model, 2, 64)
    assert type(runner).__name__ == "HFRunner"
    assert "attention ran in 0 of its 2 layers" in runner.reason


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_prefix_cache_serves_any_family_with_the_same_answer(tokenizer: Any, family: str) -> None:
    """The generic runner exposes its slot cache, so the engine's prefix cache reuses KV for any family
    (sliding windows and soft-capping included): a repeated and an extended prompt give generate's answer."""
    model = family_model(tokenizer, family)
    system = [(7 * i) % 300 + 3 for i in range(70)]  # four full 16-token blocks before its last token
    follow = system + [11, 12, 13, 14, 15]
    with running_engine(tokenizer, model) as engine:
        assert engine.runner_name == "GenericRunner"
        results = [list(engine.submit(request(f"r{i}", ids, greedy(10))))[-1] for i, ids in
                   enumerate([system, system, follow])]
    for ids, finished in zip([system, system, follow], results, strict=True):
        assert isinstance(finished, Finished)
        assert finished.text == tokenizer.decode(generate_ids(model, ids, 10), skip_special_tokens=True)
    assert [f.cached_tokens for f in results if isinstance(f, Finished)] == [0, 64, 64]
