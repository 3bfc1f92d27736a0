"""The engine's int8 / int4 weights on the real embedded SmolLM2-135M-Instruct agree with bfloat16.

Teacher-forced: along bfloat16's greedy continuation of a few chat prompts, the quantized runner's
next-token argmax must be bfloat16's at least 90% of the time, and its mean log-likelihood of that
continuation within 0.1 nat per token (benchmarks/quality_check.py measures the same on 20 prompts).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_server.engine.llama_runner import LlamaRunner
from tests.conftest import embedded_gguf

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain how the human heart works.",
    "Write a Python function that returns the factorial of n.",
]
TOKENS = 24


@pytest.fixture(scope="module")
def bf16_model() -> tuple[Any, Any]:
    from llm_server.helper_functionality.model_loading import initialize

    return initialize(device="cpu", model_id=str(embedded_gguf()), dtype="bfloat16", compile=False, quantization="none")


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def forced_run(runner: LlamaRunner, prompts: list[list[int]], forced: list[list[int]] | None) -> tuple[
        list[list[int]], list[float]]:
    """(argmax at each step, mean log-probability of the fed tokens per prompt); greedy when ``forced`` is None."""
    handles = [runner.open() for _ in prompts]
    argmax: list[list[int]] = [[] for _ in prompts]
    logprob = [0.0] * len(prompts)
    with torch.inference_mode():
        logits = runner.forward(handles, prompts)
        for step in range(TOKENS):
            best = logits.argmax(-1).tolist()
            fed = [row[step] for row in forced] if forced is not None else best
            logp = torch.log_softmax(logits.float(), -1)
            for row, token in enumerate(fed):
                argmax[row].append(best[row])
                logprob[row] += float(logp[row, token]) / TOKENS
            logits = runner.forward(handles, [[t] for t in fed])
    return argmax, logprob


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_agree_with_bf16_on_the_embedded_model(bf16_model: tuple[Any, Any], mode: str) -> None:
    tokenizer, model = bf16_model
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    reference, reference_logprob = forced_run(LlamaRunner(model, max_slots=4, max_context=256), prompts, None)
    quantized = LlamaRunner(model, max_slots=4, max_context=256, quantization=mode)
    assert quantized.weight_bytes < LlamaRunner(model, max_slots=1, max_context=8).weight_bytes * 0.6
    argmax, logprob = forced_run(quantized, prompts, reference)
    pairs = [(a, b) for row, ref in zip(argmax, reference, strict=True) for a, b in zip(row, ref, strict=True)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert agreement >= 0.9, agreement
    for quantized_lp, reference_lp in zip(logprob, reference_logprob, strict=True):
        assert quantized_lp > reference_lp - 0.1
