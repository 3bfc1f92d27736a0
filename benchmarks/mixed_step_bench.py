#!/usr/bin/env python3
"""One forward or two per step? A prompt chunk beside 16 decode rows, timed on ``LlamaRunner`` directly.

The step token budget (issue 21) runs, in a step where sequences decode, a prompt chunk of up to
``step_token_budget - decoding`` tokens. vLLM puts the chunk and the decode rows in ONE forward
(its kernels take rows of different lengths, flattened). ``LlamaRunner.forward`` pads every row
to the longest, so one mixed forward here makes each decode row a chunk-long row. This times, for
each chunk size, with the embedded model (bf16, as the server loads it):

- ``decode``: the 16 decode rows alone (one token each, ~40-token contexts);
- ``chunk``: the chunk alone (one sequence, C new tokens);
- ``two forwards``: decode + chunk, what the engine runs;
- ``one padded forward``: 17 rows padded to C, what mixing them in today's runner would cost.

Median of ``--rounds``, fresh caches for every sample. Run from the repository root::

    .venv/bin/python benchmarks/mixed_step_bench.py --chunks 64,128,256,496
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402

PROMPT = "Write a detailed essay about the history of the Roman Empire."


def timed(runner: LlamaRunner, prompt: list[int], rows: int, chunk: list[int], what: str) -> float:
    """Seconds of one ``what`` ("decode", "chunk", "mixed") forward, on fresh caches."""
    handles = [runner.open() for _ in range(rows)]
    long = runner.open()
    logits = runner.forward(handles, [prompt] * rows)  # the running sequences' prompts (untimed)
    nxt = [[int(t)] for t in logits.argmax(-1).tolist()]
    calls: dict[str, Callable[[], Any]] = {
        "decode": lambda: runner.forward(handles, nxt),
        "chunk": lambda: runner.forward([long], [chunk]),
        "mixed": lambda: runner.forward([*handles, long], [*nxt, chunk]),
    }
    started = time.perf_counter()
    calls[what]()
    elapsed = time.perf_counter() - started
    for handle in (*handles, long):
        runner.release(handle)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--chunks", default="64,128,256,496")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokenizer, model = initialize(device="cpu", dtype="bfloat16", compile=False, quantization="none")
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
    runner = LlamaRunner(model, max_slots=args.rows + 1, max_context=2048)
    print(f"{args.rows} decode rows (contexts of {len(prompt)} tokens), {torch.get_num_threads()} threads, "
          f"median of {args.rounds}")
    print("| chunk tokens | decode ms | chunk ms | two forwards ms | one padded forward ms | padded / two |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for size in (int(c) for c in args.chunks.split(",")):
            chunk = (prompt * (size // len(prompt) + 1))[:size]
            ms = {what: 1e3 * statistics.median(timed(runner, prompt, args.rows, chunk, what)
                                                for _ in range(args.rounds + 1))
                  for what in ("decode", "chunk", "mixed")}
            two = ms["decode"] + ms["chunk"]
            print(f"| {size} | {ms['decode']:.1f} | {ms['chunk']:.1f} | {two:.1f} | {ms['mixed']:.1f} | "
                  f"{ms['mixed'] / two:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
