#!/usr/bin/env python3
"""In-process micro-benchmark of the batching engine (no HTTP): aggregate tok/s and TTFT.

It loads the embedded SmolLM2-135M-Instruct (or ``--model``) with ``initialize``, builds a
``BatchEngine`` and drives it closed-loop: at each concurrency level, N workers each submit a
greedy chat request (the same system message and prompts as ``bench_serving.py``), read its
stream to the end, and submit the next one. End-of-sequence is ignored so every request
generates exactly ``--max-tokens`` tokens. Printed per level: aggregate output tokens/s,
time to first token p50/p95 and inter-token latency p50.

    .venv/bin/python benchmarks/engine_microbench.py                  # bfloat16, 1/4/8/16
    .venv/bin/python benchmarks/engine_microbench.py --dtype float32 --levels 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The same chat requests as the HTTP benchmark beside this file.
from bench_serving import PROMPTS, SYSTEM_MESSAGE  # noqa: E402


@dataclass
class Sample:
    ttft: float
    itl: float
    tokens: int


def prompt_ids(tokenizer: Any, index: int) -> list[int]:
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": PROMPTS[index % len(PROMPTS)]},
    ]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


async def one_request(engine: Any, tokenizer: Any, index: int, max_tokens: int) -> Sample:
    from llm_server.engine.types import Finished, GenerationRequest, SamplingParams, TextDelta

    params = SamplingParams(max_new_tokens=max_tokens, do_sample=False)
    sent = time.perf_counter()
    stream = engine.submit(GenerationRequest(f"bench-{index}", prompt_ids(tokenizer, index), params))
    first = last = 0.0
    tokens = 0
    async for event in stream:
        if isinstance(event, TextDelta):
            last = time.perf_counter()
            first = first or last
        elif isinstance(event, Finished):
            tokens = event.completion_tokens
    return Sample(ttft=first - sent, itl=(last - first) / max(tokens - 1, 1), tokens=tokens)


async def run_level(engine: Any, tokenizer: Any, concurrency: int, requests: int, max_tokens: int) -> dict[str, float]:
    samples: list[Sample] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for index in counter:
            samples.append(await one_request(engine, tokenizer, index, max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ttfts = sorted(s.ttft for s in samples)
    return {
        "concurrency": concurrency,
        "tok_s": sum(s.tokens for s in samples) / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "itl_p50": statistics.median(s.itl for s in samples),
        "full": sum(s.tokens == max_tokens for s in samples) / len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id for initialize() (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests per worker at each level")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()

    import torch

    from llm_server.engine.batch_engine import BatchEngine, EngineConfig
    from llm_server.helper_functionality.model_loading import initialize

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model = initialize(device="cpu", model_id=args.model, dtype=args.dtype, compile=False)
    levels = [int(x) for x in args.levels.split(",")]
    engine = BatchEngine(tokenizer, model, "bench", EngineConfig(max_running=max(levels)))
    engine.eos_ids = frozenset()  # every request generates exactly --max-tokens tokens
    engine.start()
    try:
        asyncio.run(run_level(engine, tokenizer, 1, 1, 8))  # warm-up
        print(f"engine micro-benchmark: dtype {args.dtype}, {args.max_tokens} new tokens, torch threads "
              f"{torch.get_num_threads()}, runner {type(engine._runner).__name__}")
        print("| concurrent | tok/s | TTFT p50 (s) | TTFT p95 (s) | ITL p50 (ms) |")
        print("| --- | --- | --- | --- | --- |")
        for level in levels:
            row = asyncio.run(run_level(engine, tokenizer, level, level * args.rounds, args.max_tokens))
            print(f"| {level} | {row['tok_s']:.1f} | {row['ttft_p50']:.3f} | {row['ttft_p95']:.3f} | "
                  f"{row['itl_p50'] * 1e3:.1f} |", flush=True)
    finally:
        engine.shutdown(timeout_s=30)


if __name__ == "__main__":
    main()
