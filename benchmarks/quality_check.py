#!/usr/bin/env python3
"""Quality cost of the engine's weight-only quantization (int8, int4) against bfloat16 weights.

It loads the embedded SmolLM2-135M-Instruct, builds the engine's ``LlamaRunner`` on it once per
weight mode (float32, bfloat16, bfloat16 + int8 weights, bfloat16 + int4 weights, LM head variants) and measures,
against the bfloat16 runner:

- free-running greedy agreement: 20 chat prompts x 64 greedy tokens, the fraction of positions
  whose token is identical, and the mean number of tokens before the first difference;
- teacher-forced top-1 agreement: along bfloat16's greedy continuations, how often the mode's
  argmax is bfloat16's;
- the mean log-likelihood per token of a fixed English text (higher is better).

float32 vs bfloat16 is printed too: it shows how much two "unquantized" runs already differ.

    .venv/bin/python benchmarks/quality_check.py                 # all modes
    .venv/bin/python benchmarks/quality_check.py --prompts 8 --tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402
from servebench.client import PROMPTS as SERVING_PROMPTS  # noqa: E402

# The serving benchmark's 16 open-ended prompts, plus four short tasks.
PROMPTS: tuple[str, ...] = (
    *SERVING_PROMPTS,
    "What is the capital of France? Answer in one sentence.",
    "List five prime numbers and explain why they are prime.",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "Write a Python function that returns the factorial of n.",
)

TEXT = (
    "The river rose slowly through the night, and by morning the low fields beyond the village were "
    "under water. Farmers gathered at the bridge to watch the brown current carry branches, fence posts "
    "and the occasional bewildered chicken toward the sea. Nobody could remember a flood this early in "
    "the spring. The old miller said that his grandfather had seen the water reach the church steps, "
    "but most people thought he was exaggerating, as he usually did. By noon the rain had stopped, the "
    "clouds broke apart, and sunlight fell on the flooded meadows, turning them into a wide, shining lake. "
    "Children ran along the embankment throwing sticks into the water, while their parents counted the "
    "damage and wondered how long it would take for the ground to dry before the planting could begin."
)

MODES: dict[str, tuple[str, str | None, str | None]] = {  # name -> (dtype, layers, LM head)
    "float32": ("float32", None, None),
    "bf16": ("bfloat16", None, None),
    "int8": ("bfloat16", "int8", "int8"),  # the engine's int8 mode
    "int4": ("bfloat16", "int4", "int8"),  # the engine's int4 mode
    "int4-head-bf16": ("bfloat16", "int4", None),
    "int4-head-int4": ("bfloat16", "int4", "int4"),
    "auto": ("bfloat16", "auto", "auto-int8"),  # the engine's auto mode, 20 prompts in one batch: bf16 path
    "auto-1": ("bfloat16", "auto", "auto-int8"),  # auto, one prompt at a time (one user): int4 decode steps
}
ONE_AT_A_TIME = {"auto-1"}


@dataclass
class Quality:
    greedy: list[list[int]]  # each prompt's greedy continuation
    loglik: float  # mean log-likelihood per token of TEXT


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def greedy(runner: LlamaRunner, prompts: list[list[int]], tokens: int, forced: list[list[int]] | None) -> tuple[
        list[list[int]], list[list[int]]]:
    """(greedy continuations, argmax at each step); with ``forced`` the fed tokens are those instead."""
    handles = [runner.open() for _ in prompts]
    logits = runner.forward(handles, prompts)
    chosen: list[list[int]] = [[] for _ in prompts]
    argmax: list[list[int]] = [[] for _ in prompts]
    for step in range(tokens):
        best = logits.argmax(-1).tolist()
        for row, token in enumerate(best):
            argmax[row].append(token)
            chosen[row].append(forced[row][step] if forced is not None else token)
        if step + 1 < tokens:
            logits = runner.forward(handles, [[c[-1]] for c in chosen])
    for handle in handles:
        runner.release(handle)
    return chosen, argmax


def mean_loglik(runner: LlamaRunner, ids: list[int]) -> float:
    """Mean log p(token | prefix) over ``ids[1:]``, one token per forward (the runner returns last-token logits)."""
    handle = runner.open()
    total = 0.0
    logits = runner.forward([handle], [ids[:1]])
    for token in ids[1:]:
        total += float(torch.log_softmax(logits[0].float(), -1)[token])
        logits = runner.forward([handle], [[token]])
    runner.release(handle)
    return total / (len(ids) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    models: dict[str, Any] = {}
    tokenizer = None
    for dtype in sorted({MODES[m][0] for m in modes} | {"bfloat16"}):
        tokenizer, models[dtype] = initialize(device="cpu", dtype=dtype, compile=False, quantization="none")
    assert tokenizer is not None
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS[: args.prompts]]
    text_ids = list(tokenizer(TEXT)["input_ids"])
    print(f"{len(prompts)} prompts x {args.tokens} greedy tokens; text of {len(text_ids)} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def runner(mode: str) -> LlamaRunner:
        dtype, quantization, head = MODES[mode]
        return LlamaRunner(models[dtype], max_slots=len(prompts), max_context=1024, quantization=quantization,
                           head_quantization=head)

    with torch.inference_mode():
        base = runner("bf16")
        reference, _ = greedy(base, prompts, args.tokens, None)
        base_loglik = mean_loglik(base, text_ids)
        del base
        header = "| weights | greedy identical tokens | tokens before 1st diff | teacher-forced top-1 | loglik/token |"
        print(header + "\n| --- | --- | --- | --- | --- |")
        for mode in modes:
            started = time.perf_counter()
            current = runner(mode)
            if mode in ONE_AT_A_TIME:
                free = [greedy(current, [p], args.tokens, None)[0][0] for p in prompts]
                forced_argmax = [greedy(current, [p], args.tokens, [r])[1][0] for p, r in zip(prompts, reference,
                                                                                               strict=True)]
            else:
                free, _ = greedy(current, prompts, args.tokens, None)
                _, forced_argmax = greedy(current, prompts, args.tokens, reference)
            loglik = base_loglik if mode == "bf16" else mean_loglik(current, text_ids)
            print(f"| {mode} | {identical(free, reference):.3f} | {first_difference(free, reference):.1f} "
                  f"| {identical(forced_argmax, reference):.3f} | {loglik:.4f} |"
                  f"  ({time.perf_counter() - started:.0f}s)",
                  flush=True)


def identical(rows: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(a == b for row, ref in zip(rows, reference, strict=True) for a, b in zip(row, ref, strict=True))
    return same / sum(len(ref) for ref in reference)


def first_difference(rows: list[list[int]], reference: list[list[int]]) -> float:
    lengths = [
        next((i for i, (a, b) in enumerate(zip(row, ref, strict=True)) if a != b), len(ref))
        for row, ref in zip(rows, reference, strict=True)
    ]
    return sum(lengths) / len(lengths)


if __name__ == "__main__":
    main()
