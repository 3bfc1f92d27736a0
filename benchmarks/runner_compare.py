#!/usr/bin/env python3
"""Bare decode step of LlamaRunner against GenericRunner on the same model, interleaved (issue 22).

Loads the embedded SmolLM2 (or ``--model``) once, builds both runners over it (LlamaRunner first:
GenericRunner replaces the model's linears) and times their ``forward`` alone at each batch size:
a 60-token prompt per sequence, then decode steps. The runners alternate round by round, so a
busy machine slows both alike; the median per runner and batch size is printed with the ratio.

    .venv/bin/python benchmarks/runner_compare.py --levels 1,16,32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_server.engine.wait_policy import apply_server_wait_policy, wait_policy  # noqa: E402

apply_server_wait_policy()


def step_ms(runner: Any, n: int, steps: int) -> float:
    """ms per decode step of ``n`` sequences (after a 60-token prefill each)."""
    handles = [runner.open() for _ in range(n)]
    runner.forward(handles, [list(range(100, 160))] * n)
    for _ in range(3):
        runner.forward(handles, [[5]] * n)
    started = time.perf_counter()
    for _ in range(steps):
        runner.forward(handles, [[5]] * n)
    elapsed = (time.perf_counter() - started) / steps * 1e3
    for handle in handles:
        runner.release(handle)
    runner.idle()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id for initialize() (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--levels", default="1,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    import torch

    from llm_server.engine.generic_runner import GenericRunner
    from llm_server.engine.llama_runner import LlamaRunner
    from llm_server.helper_functionality.model_loading import initialize

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    _, model = initialize(device="cpu", model_id=args.model, dtype=args.dtype, compile=False)
    runners = {"LlamaRunner": LlamaRunner(model, max(levels), 2048),
               "GenericRunner": GenericRunner(model, max(levels), 2048)}
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in runners for n in levels}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for n in levels:
                for name, runner in runners.items():
                    times[name, n].append(step_ms(runner, n, args.steps))
    print(f"bare decode step, {args.dtype}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, "
          f"OpenMP wait policy: {wait_policy()}")
    print("| sequences | LlamaRunner ms/step | GenericRunner ms/step | Generic / Llama tok/s |")
    print("| --- | --- | --- | --- |")
    for n in levels:
        llama, generic = statistics.median(times["LlamaRunner", n]), statistics.median(times["GenericRunner", n])
        print(f"| {n} | {llama:.1f} | {generic:.1f} | {llama / generic:.2f} |")


if __name__ == "__main__":
    main()
