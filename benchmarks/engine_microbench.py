#!/usr/bin/env python3
"""In-process micro-benchmark of the batching engine (no HTTP): aggregate tok/s and TTFT.

It loads the embedded SmolLM2-135M-Instruct (or ``--model``) with ``initialize``, builds a
``BatchEngine`` and drives it closed-loop: at each concurrency level, N workers each submit a
greedy chat request (the same system message and prompts as ``bench_serving.py``), read its
stream to the end, and submit the next one. End-of-sequence is ignored so every request
generates exactly ``--max-tokens`` tokens. Printed per level: aggregate output tokens/s,
time to first token p50/p95, inter-token latency p50, and the engine's efficiency: served tok/s
divided by the bare forward's tok/s on the same batch size (the runner's ``forward`` alone, timed
in a separate process whose one thread loads the model and steps it: a 60-token prompt, then
decode steps; issue 9's target is >= 0.9), and the process's RSS once the level is over
(``benchmarks/engine_memory.py`` reports the peaks). Both sides run with the server's OpenMP wait
policy (``llm_server.engine.wait_policy``: ``GOMP_SPINCOUNT=10000`` unless one is exported).

The model is loaded the way the server loads it: by the engine's own thread
(``BatchEngine.from_loader``). ``--split-load`` loads it on the main thread instead (the
arrangement issue 9 measured as 2x slower on 2 cores), for comparison.

    .venv/bin/python benchmarks/engine_microbench.py                  # bfloat16, 1/16/32/48/64
    .venv/bin/python benchmarks/engine_microbench.py --dtype float32 --levels 1,16
    .venv/bin/python benchmarks/engine_microbench.py --runner generic --levels 1,16,32  # GenericRunner
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The server's OpenMP wait policy (GOMP_SPINCOUNT=10000 unless exported), set before torch loads here
# and inherited by the bare-forward subprocess, so both sides of the efficiency run as the server does.
from llm_server.engine.wait_policy import apply_server_wait_policy, wait_policy  # noqa: E402

apply_server_wait_policy()

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


def rss_mb() -> float:
    """This process's resident set size in MB (Linux ``/proc``; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bare_forward_ms(
    dtype: str, model_id: str | None, batches: list[int], threads: int, runner_choice: str = "auto"
) -> dict[int, float]:
    """ms per decode step of the runner's ``forward`` alone, per batch size (this thread only)."""
    import torch

    from llm_server.engine.model_setup import RUNNER_ATTR, make_runner
    from llm_server.helper_functionality.model_loading import initialize

    if threads:
        torch.set_num_threads(threads)
    _, model = initialize(device="cpu", model_id=model_id, dtype=dtype, compile=False)
    setattr(model, RUNNER_ATTR, runner_choice)
    runner = make_runner(model, max_slots=max(batches), max_context=2048)
    result: dict[int, float] = {}
    with torch.inference_mode():
        for n in batches:
            handles = [runner.open() for _ in range(n)]
            runner.forward(handles, [list(range(100, 160))] * n)
            for _ in range(4):
                runner.forward(handles, [[5]] * n)
            started = time.perf_counter()
            for _ in range(32):
                runner.forward(handles, [[5]] * n)
            result[n] = (time.perf_counter() - started) / 32 * 1e3
            for handle in handles:
                runner.release(handle)
    return result


def bare_in_subprocess(args: argparse.Namespace) -> dict[int, float]:
    """:func:`bare_forward_ms` in a fresh process (its torch threads never meet the engine's)."""
    command = [sys.executable, __file__, "--bare", "--dtype", args.dtype, "--levels", args.levels,
               "--threads", str(args.threads), "--runner", args.runner]
    command += ["--model", args.model] if args.model else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id for initialize() (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--levels", default="1,16,32,48,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests per worker at each level")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's choice)")
    parser.add_argument("--split-load", action="store_true", help="load the model on the main thread (slow)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-forward reference")
    parser.add_argument("--runner", default="auto", choices=["auto", "llama", "generic", "hf"],
                        help="the engine's runner (model_setup.RUNNER_ATTR; auto: the engine's choice)")
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # the subprocess's job
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.bare:
        print(json.dumps(bare_forward_ms(args.dtype, args.model, levels, args.threads, args.runner)))
        return
    bare = {} if args.no_bare else bare_in_subprocess(args)
    engine, tokenizer = start_engine(args, levels)
    try:
        asyncio.run(run_level(engine, tokenizer, 1, 1, 8))  # warm-up
        print(f"engine micro-benchmark: dtype {args.dtype}, {args.max_tokens} new tokens, runner "
              f"{engine.runner_name}, {'model loaded on the main thread' if args.split_load else 'one thread'}, "
              f"OpenMP wait policy: {wait_policy()}")
        print(f"RSS after load: {rss_mb():.0f} MB")
        print("| concurrent | tok/s | TTFT p50 (s) | TTFT p95 (s) | ITL p50 (ms) | bare step (ms) | efficiency "
              "| RSS after (MB) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for level in levels:
            row = asyncio.run(run_level(engine, tokenizer, level, level * args.rounds, args.max_tokens))
            step = bare.get(level)
            efficiency = f"{row['tok_s'] / (level * 1e3 / step):.2f}" if step else "-"
            print(f"| {level} | {row['tok_s']:.1f} | {row['ttft_p50']:.3f} | {row['ttft_p95']:.3f} | "
                  f"{row['itl_p50'] * 1e3:.1f} | {f'{step:.1f}' if step else '-'} | {efficiency} | {rss_mb():.0f} |",
                  flush=True)
    finally:
        engine.shutdown(timeout_s=30)


def start_engine(args: argparse.Namespace, levels: list[int]) -> tuple[Any, Any]:
    """A started engine for the benchmark, and its tokenizer."""
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig
    from llm_server.engine.llama_weights import mark_engine_owned
    from llm_server.engine.model_setup import RUNNER_ATTR
    from llm_server.helper_functionality.model_loading import initialize

    config = EngineConfig(max_running=max(levels), threads=args.threads)

    def load() -> tuple[Any, Any]:
        tokenizer, model = initialize(device="cpu", model_id=args.model, dtype=args.dtype, compile=False)
        mark_engine_owned(model)  # as the server's loader does: the runner keeps one copy of the weights
        setattr(model, RUNNER_ATTR, args.runner)
        return tokenizer, model

    if args.split_load:
        engine = BatchEngine(*load(), "bench", config)
    else:
        engine = BatchEngine.from_loader(load, "bench", config)
    engine.start()
    engine.eos_ids = frozenset()  # every request generates exactly --max-tokens tokens
    return engine, engine.tokenizer


if __name__ == "__main__":
    main()
