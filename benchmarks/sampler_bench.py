#!/usr/bin/env python3
"""Sampling cost per decode step (issue 26's target: at most 10% of the step for 16 rows with
different penalties, biases and min-p).

Loads the embedded SmolLM2-135M-Instruct (float32, CPU) and times, as medians over ``--reps``:
the model's forward of one decode step for 16 rows (HF forward with a 64-token KV cache), and
``Sampler.select`` on those 16 rows' logits with (a) plain greedy rows, (b) plain sampled rows,
(c) 16 rows that each set different presence/frequency/repetition penalties, a logit_bias, top_k,
min_p, top_p and a seed, each with 32 generated ids observed. The logits come from 64 random
token ids per row (a flat next-token distribution: the worst case for top-p without top-k) and,
for (c) again as ``chat_prompts_every_field_different``, from 16 real questions rendered through
the chat template (the peaked distributions a served chat sees). Writes a JSON result under
``benchmarks/results/``. The process runs with a server process's OpenMP wait policy and glibc
heap settings (``llm_server.engine.wait_policy``, ``llm_server.engine.heap_policy``);
``--libc-heap`` keeps glibc's default heap settings instead.

    .venv/bin/python benchmarks/sampler_bench.py --reps 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_server.engine.heap_policy import apply_server_heap_policy  # noqa: E402
from llm_server.engine.wait_policy import apply_server_wait_policy  # noqa: E402

apply_server_wait_policy()  # as create_app does, before torch loads

import torch  # noqa: E402

from llm_server.engine.sampler import Sampler, SamplerState  # noqa: E402
from llm_server.engine.types import SamplingParams  # noqa: E402

ROWS = 16
QUESTIONS = [
    "What is the capital of France?", "Explain how REST APIs work.", "Give me three tips for a cover letter.",
    "Who wrote Pride and Prejudice?", "What is 17 times 23?", "How do vaccines work?",
    "Write a haiku about autumn.", "What is the boiling point of water in Fahrenheit?",
    "Summarize the plot of Hamlet.", "What causes the seasons on Earth?", "How do I reverse a list in Python?",
    "What is photosynthesis?", "Name three primary colors.", "What year did World War II end?",
    "How many legs does a spider have?", "Why is the sky blue?",
]


def median_s(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rich_params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.6 + 0.05 * i, top_p=0.8 + 0.01 * i, top_k=10 * (i % 5), min_p=0.01 * (i % 4),
                          presence_penalty=0.1 * (i % 3), frequency_penalty=0.2 * (i % 4),
                          repetition_penalty=1.0 + 0.05 * (i % 3), logit_bias=((i, 5.0), (100 + i, -100.0)),
                          seed=i if i % 2 else None)


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def states(params: list[SamplingParams], vocab: int) -> list[SamplerState]:
    out = [SamplerState.create(p, list(range(40)), vocab, torch.device("cpu")) for p in params]
    for state in out:
        for t in range(32):
            state.observe(t * 7 % vocab)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--libc-heap", action="store_true", help="keep glibc's default heap settings")
    args = parser.parse_args()
    heap = "glibc defaults" if args.libc_heap or not apply_server_heap_policy() else "server heap policy"
    from llm_server.helper_functionality.model_loading import embedded_gguf_path, initialize

    tokenizer, model = initialize(device="cpu", model_id=str(embedded_gguf_path()), dtype="float32", compile=False,
                                  quantization="none")
    vocab = int(model.config.vocab_size)
    with torch.no_grad():
        prefill = model(torch.randint(0, vocab, (ROWS, 64)), use_cache=True)
        cache = prefill.past_key_values
        step_ids = torch.randint(0, vocab, (ROWS, 1))
        logits = prefill.logits[:, -1].float().contiguous()

        def forward() -> None:
            model(step_ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # back to the 64-token prompt

        forward_s = median_s(forward, args.reps)
    sampler = Sampler(torch.device("cpu"), seed=0, top_k=50)
    cases = {
        "greedy_plain": [SamplingParams(do_sample=False) for _ in range(ROWS)],
        "sampled_plain": [SamplingParams(temperature=0.7) for _ in range(ROWS)],
        "sampled_every_field_different": [rich_params(i) for i in range(ROWS)],
    }
    result: dict[str, Any] = {"rows": ROWS, "vocab": vocab, "forward_step_s": forward_s,
                              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                              "heap": heap}
    for name, params in cases.items():
        row_states = states(params, vocab)
        seconds = median_s(lambda s=row_states: sampler.select(logits, s), args.reps)  # type: ignore[misc]
        result[name] = {"select_s": seconds, "share_of_step": seconds / (seconds + forward_s)}
    with torch.no_grad():
        rows = [model(torch.tensor([chat_ids(tokenizer, q)])).logits[0, -1].float() for q in QUESTIONS]
        chat_logits = torch.stack(rows)
    row_states = states(cases["sampled_every_field_different"], vocab)
    seconds = median_s(lambda: sampler.select(chat_logits, row_states), args.reps)
    share = seconds / (seconds + forward_s)
    result["chat_prompts_every_field_different"] = {"select_s": seconds, "share_of_step": share}
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"sampler_bench_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
