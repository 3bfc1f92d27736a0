"""BatchEngine on the real embedded SmolLM2-135M-Instruct (float32): batched == solo generate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.types import Finished, GenerationRequest, SamplingParams, TextDelta

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors, separated by commas.",
    "Translate 'good morning' into Spanish, French and German.",
]


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def solo_generate(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return [int(t) for t in out[0, len(prompt):]]


def test_greedy_requests_joining_a_running_batch_match_generate(embedded: tuple[Any, Any]) -> None:
    tokenizer, model = embedded
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    budgets = [24, 20, 16, 24]
    engine = BatchEngine(tokenizer, model, "embedded", EngineConfig(max_running=4))
    engine.start()
    assert engine.runner_name == "LlamaRunner"  # the compact batched forward, not the fallback

    async def scenario() -> list[tuple[str, Finished]]:
        async def consume(stream: Any, started: asyncio.Event) -> tuple[str, Finished]:
            text = ""
            async for event in stream:
                if isinstance(event, TextDelta):
                    text += event.text
                    if len(text) > 8:
                        started.set()
                else:
                    started.set()
                    return text, event
            raise AssertionError("no Finished event")

        tasks = []
        for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
            started = asyncio.Event()
            params = SamplingParams(max_new_tokens=budget, do_sample=False)
            stream = engine.submit(GenerationRequest(f"q{i}", prompt, params))
            tasks.append(asyncio.create_task(consume(stream, started)))
            await started.wait()  # the next request joins while this one decodes
        return list(await asyncio.gather(*tasks))

    try:
        results = asyncio.run(scenario())
    finally:
        engine.shutdown(timeout_s=30)
    for prompt, budget, (streamed, finished) in zip(prompts, budgets, results, strict=True):
        reference = solo_generate(model, prompt, budget)
        assert finished.text == streamed == tokenizer.decode(reference, skip_special_tokens=True)
        assert finished.completion_tokens == len(reference)
        ended_on_eos = reference[-1] == tokenizer.eos_token_id
        assert finished.reason == ("stop" if ended_on_eos else "length")
    assert "Paris" in results[0][1].text


def test_seeded_sampling_is_reproducible_on_the_real_model(embedded: tuple[Any, Any]) -> None:
    tokenizer, model = embedded
    prompt = chat_ids(tokenizer, QUESTIONS[1])
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    engine = BatchEngine(tokenizer, model, "embedded", EngineConfig(max_running=2))
    engine.start()
    try:
        first = engine.submit(GenerationRequest("a", prompt, params))
        other_prompt = chat_ids(tokenizer, QUESTIONS[0])
        other = engine.submit(GenerationRequest("b", other_prompt, SamplingParams(max_new_tokens=16)))
        texts = [first.result().text, other.result().text]
        again = engine.submit(GenerationRequest("c", prompt, params)).result().text
    finally:
        engine.shutdown(timeout_s=30)
    assert texts[0] == again and texts[0]
