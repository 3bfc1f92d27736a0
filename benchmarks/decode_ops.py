#!/usr/bin/env python3
"""Ops per decode step of the embedded model's ``LlamaRunner``, and the step's time (no engine, no HTTP).

Counts the aten ops one decode step of ``--batch`` sequences dispatches (``torch.profiler``:
top-level ops, the ones Python calls; and all ops, nested included), then times decode steps,
the modes interleaved round after round (the CPU may be shared: compare within one run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_ops.py --modes bf16,auto --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.weight_bench import MODES, _prompt_ids  # noqa: E402
from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.engine.runner import KVHandle  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402


def count_ops(runner: LlamaRunner, handles: list[KVHandle]) -> tuple[int, int, Counter[str]]:
    """(top-level aten ops, all aten ops, top-level ops by name) of one decode step."""
    tokens = [[5] for _ in handles]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.forward(handles, tokens)
    events = [e for e in prof.events() if e.name.startswith("aten::") or e.name.startswith("mkldnn::")]
    ids = {id(e) for e in events}
    top = [e for e in events if e.cpu_parent is None or id(e.cpu_parent) not in ids]
    return len(top), len(events), Counter(e.name for e in top)


def time_steps(runner: LlamaRunner, handles: list[KVHandle], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        runner.forward(handles, [[5] for _ in handles])
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="bf16,auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--show", type=int, default=0, help="list the N most frequent top-level ops")
    options = parser.parse_args()
    tokenizer, model = initialize(device="cpu", dtype="bfloat16", compile=False, quantization="none")
    prompt = _prompt_ids(tokenizer)
    modes = options.modes.split(",")
    runners = {m: LlamaRunner(model, max_slots=options.batch, max_context=1024, quantization=MODES[m]) for m in modes}
    print(f"{torch.get_num_threads()} threads, batch {options.batch}, {options.steps} steps x {options.rounds} rounds")
    print("| weights | top-level ops / step | all aten ops / step | decode ms / step (median) |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        handles = {m: [r.open() for _ in range(options.batch)] for m, r in runners.items()}
        for mode, runner in runners.items():
            runner.forward(handles[mode], [prompt] * options.batch)
            time_steps(runner, handles[mode], 2)  # warm-up
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(options.rounds):
            for mode, runner in runners.items():
                samples[mode].append(time_steps(runner, handles[mode], options.steps))
        for mode, runner in runners.items():
            top, total, names = count_ops(runner, handles[mode])
            print(f"| {mode} | {top} | {total} | {statistics.median(samples[mode]) * 1e3:.2f} |", flush=True)
            for name, count in names.most_common(options.show):
                print(f"  {count:5d} {name}")


if __name__ == "__main__":
    main()
