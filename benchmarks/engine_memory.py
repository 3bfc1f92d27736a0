#!/usr/bin/env python3
"""Resident memory of the batching engine (no HTTP): after load, after a burst, after a long prompt.

It starts a ``BatchEngine`` as the server does (the model loaded on the engine's thread, the
embedded SmolLM2-135M-Instruct unless ``--model``) and prints, per phase, the process's RSS once
the phase is over and the engine idle, and its peak RSS during the phase (``VmHWM``, reset
between phases through ``/proc/self/clear_refs``; Linux only):

1. after load and warm-up;
2. ``--concurrent`` chat requests of ``--max-tokens`` new tokens at once (greedy, EOS ignored);
3. one prompt of about ``--long-prompt`` tokens (a chat prompt repeated), ``--max-tokens`` new.

Memory only: the numbers do not depend on how busy the machine is (speed does).

    .venv/bin/python benchmarks/engine_memory.py --dtype bfloat16
    .venv/bin/python benchmarks/engine_memory.py --dtype bfloat16 --quantization int4
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_microbench import one_request, prompt_ids  # noqa: E402


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start a new peak-RSS window (``VmHWM`` := current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def settle(engine: Any) -> None:
    """Wait until the engine has no request and has had its idle call."""
    for _ in range(100):
        if engine.stats().running == 0 and engine.stats().waiting == 0:
            break
        time.sleep(0.05)
    time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quantization", default="none", help="none | int8 | int4 (weight-only, CPU)")
    args = parser.parse_args()

    from llm_server.engine.batch_engine import BatchEngine, EngineConfig
    from llm_server.engine.llama_weights import mark_engine_owned
    from llm_server.helper_functionality.model_loading import initialize

    def load() -> tuple[Any, Any]:
        tokenizer, model = initialize(device="cpu", model_id=args.model, dtype=args.dtype, compile=False,
                                      quantization=args.quantization)
        mark_engine_owned(model)  # as the server's loader does: the runner keeps one copy of the weights
        return tokenizer, model

    reset_peak()
    engine = BatchEngine.from_loader(load, "memory", EngineConfig(threads=args.threads))
    engine.start()
    engine.eos_ids = frozenset()  # every request generates exactly --max-tokens tokens
    tokenizer = engine.tokenizer
    rows = [("after load", status_mb("VmRSS"), status_mb("VmHWM"))]
    try:
        reset_peak()

        async def burst() -> None:
            await asyncio.gather(*(one_request(engine, tokenizer, i, args.max_tokens) for i in range(args.concurrent)))

        asyncio.run(burst())
        settle(engine)
        rows.append((f"after {args.concurrent} concurrent x {args.max_tokens} tokens",
                     status_mb("VmRSS"), status_mb("VmHWM")))
        reset_peak()
        ids = prompt_ids(tokenizer, 0)
        while len(ids) < args.long_prompt:
            ids += prompt_ids(tokenizer, len(ids))
        from llm_server.engine.types import GenerationRequest, SamplingParams

        params = SamplingParams(max_new_tokens=args.max_tokens, do_sample=False)
        engine.submit(GenerationRequest("long", ids[: args.long_prompt], params)).result()
        settle(engine)
        rows.append((f"after one {args.long_prompt}-token prompt", status_mb("VmRSS"), status_mb("VmHWM")))
    finally:
        engine.shutdown(timeout_s=30)
    print(f"engine memory: dtype {args.dtype}, quantization {args.quantization}, runner {engine.runner_name}, "
          f"max_running {engine.config.max_running}")
    print("| phase | RSS after (MB) | peak RSS during (MB) |")
    print("| --- | --- | --- |")
    for name, rss, peak in rows:
        print(f"| {name} | {rss:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
