#!/usr/bin/env python3
"""``bench_multiturn.py``'s two scenarios against the engine in process (no HTTP), caching on and off.

Same conversation (ten turns over a ~1,000-token system message, whole history each turn) and the
same sixteen users sharing one system prompt (two turns each, all starting together), greedy,
``--max-tokens`` new tokens. Prompts are the tokenizer's chat template, as the server renders them.
Reported per engine: TTFT per turn, TTFT p50/p95 of the users, and the hit rate from the engine
itself (``Finished.cached_tokens`` / prompt tokens), plus whether the texts match between caching
on and off. Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multiturn_engine.py
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

from llm_server.engine.wait_policy import apply_server_wait_policy  # noqa: E402

apply_server_wait_policy()

from bench_multiturn import QUESTIONS, notes  # noqa: E402

from llm_server.engine.batch_engine import BatchEngine, EngineConfig  # noqa: E402
from llm_server.engine.types import Finished, GenerationRequest, SamplingParams, TextDelta  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402
from servebench.client import percentile  # noqa: E402

Result = tuple[float, str, int, int]  # TTFT s, text, prompt tokens, cached tokens


async def ask(engine: BatchEngine, messages: list[dict[str, str]], max_tokens: int, rid: str) -> Result:
    rendered: Any = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(rendered, list):  # transformers 5 returns a BatchEncoding
        rendered = rendered["input_ids"]
    ids = list(rendered[0] if rendered and isinstance(rendered[0], list) else rendered)
    sent, first = time.perf_counter(), None
    stream = engine.submit(GenerationRequest(rid, ids, SamplingParams(max_new_tokens=max_tokens, do_sample=False)))
    async for event in stream:
        if isinstance(event, TextDelta) and first is None:
            first = time.perf_counter() - sent
        if isinstance(event, Finished):
            return first or 0.0, event.text, event.prompt_tokens, event.cached_tokens
    raise RuntimeError("no Finished event")


async def scenarios(engine: BatchEngine, max_tokens: int, users: int) -> tuple[list[Result], list[Result]]:
    messages = [{"role": "system", "content": notes("geography")}]
    talk = []
    for i, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        talk.append(await ask(engine, messages, max_tokens, f"turn{i}"))
        messages.append({"role": "assistant", "content": talk[-1][1]})

    async def user(index: int) -> list[Result]:
        chat = [{"role": "system", "content": notes("field survey")},
                {"role": "user", "content": f"I am user {index}. " + QUESTIONS[index % len(QUESTIONS)]}]
        first = await ask(engine, chat, max_tokens, f"u{index}a")
        chat += [{"role": "assistant", "content": first[1]},
                 {"role": "user", "content": QUESTIONS[(index + 3) % len(QUESTIONS)]}]
        return [first, await ask(engine, chat, max_tokens, f"u{index}b")]

    shared = [r for rs in await asyncio.gather(*(user(i) for i in range(users))) for r in rs]
    return talk, shared


def rate(results: list[Result]) -> str:
    return f"{sum(r[3] for r in results) / max(1, sum(r[2] for r in results)):.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--caching", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    tokenizer, model = initialize(device="cpu", model_id=None, dtype=args.dtype, compile=False)
    runs: dict[bool, Any] = {}
    for caching in {"both": (True, False), "on": (True,), "off": (False,)}[args.caching]:
        engine = BatchEngine(tokenizer, model, "embedded", EngineConfig(prefix_caching=caching))
        engine.start()
        try:
            runs[caching] = asyncio.run(scenarios(engine, args.max_tokens, args.users))
        finally:
            engine.shutdown()
    print(f"multiturn_engine.py {args.dtype}, {args.max_tokens} new tokens, in process\n")
    print("| engine | " + " | ".join(f"turn {i + 1}" for i in range(len(QUESTIONS))) + " | hit rate |")
    print("|---" * (len(QUESTIONS) + 2) + "|")
    print("| prompt tokens | " + " | ".join(str(r[2]) for r in next(iter(runs.values()))[0]) + " | |")
    for caching, (talk, _) in runs.items():
        name = "caching on" if caching else "caching off"
        print(f"| {name} TTFT ms | " + " | ".join(f"{r[0] * 1000:.0f}" for r in talk) + f" | {rate(talk)} |")
    print("\n| engine | users' TTFT p50 ms | p95 ms | hit rate |\n|---|---|---|---|")
    for caching, (_, shared) in runs.items():
        ttfts = [r[0] for r in shared]
        print(f"| caching {'on' if caching else 'off'} | {percentile(ttfts, 50) * 1000:.0f} | "  # type: ignore[operator]
              f"{percentile(ttfts, 95) * 1000:.0f} | {rate(shared)} |")  # type: ignore[operator]
    if len(runs) == 2:
        pairs = zip(runs[True][0] + runs[True][1], runs[False][0] + runs[False][1], strict=True)
        same = [a[1] == b[1] for a, b in pairs]
        print(f"\nsame text with caching on and off: {sum(same)}/{len(same)} requests")


if __name__ == "__main__":
    main()
