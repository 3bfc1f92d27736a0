#!/usr/bin/env python3
"""Speed and memory of the engine's weight layouts: bf16 oneDNN-packed vs weight-only int8 / int4.

``step`` (default): the embedded model's ``LlamaRunner.forward`` timed directly (no engine, no
HTTP): a prefill of ``--batch`` chat prompts, then decode steps, per mode, the modes interleaved
round after round (the CPU may be shared: compare the ratios, each a median over rounds).
``linear``: each linear shape of the model alone, 30 distinct copies per shape so the weights
stream from memory as in a real step (int4: the VNNI kernel where the machine has it, and
PyTorch's). ``rss``: resident memory after load and after a 16-sequence run, in a fresh process
per mode, with and without the engine owning the model (only then does the runner drop the HF
module's copies of the weights).

    .venv/bin/python benchmarks/weight_bench.py step --batch 1,16
    WEIGHT_BENCH_MODES=bf16,int4 .venv/bin/python benchmarks/weight_bench.py step --batch 1,2,4,8,16
    .venv/bin/python benchmarks/weight_bench.py linear
    .venv/bin/python benchmarks/weight_bench.py rss
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llm_server.engine import quant  # noqa: E402
from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.engine.llama_weights import mark_engine_owned  # noqa: E402
from llm_server.engine.quant import make_linear  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402

MODES: dict[str, str | None] = {"bf16": None, "int8": "int8", "int4": "int4", "auto": "auto"}
PROMPT = "Write a detailed essay about the history of the Roman Empire."


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _prompt_ids(tokenizer: Any) -> list[int]:
    messages = [{"role": "user", "content": PROMPT}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _time_run(runner: LlamaRunner, prompt: list[int], batch: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, mean decode-step seconds) of one run of ``batch`` sequences."""
    handles = [runner.open() for _ in range(batch)]
    started = time.perf_counter()
    logits = runner.forward(handles, [prompt] * batch)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        logits = runner.forward(handles, [[int(t)] for t in logits.argmax(-1).tolist()])
    decode = (time.perf_counter() - started) / steps
    for handle in handles:
        runner.release(handle)
    return prefill, decode


def bench_step(batches: list[int], steps: int, rounds: int) -> None:
    tokenizer, model = initialize(device="cpu", dtype="bfloat16", compile=False, quantization="none")
    prompt = _prompt_ids(tokenizer)
    slots = max(batches)
    chosen = [m.strip() for m in os.environ.get("WEIGHT_BENCH_MODES", ",".join(MODES)).split(",")]
    runners = {m: LlamaRunner(model, max_slots=slots, max_context=1024, quantization=MODES[m]) for m in chosen}
    print(f"prompt {len(prompt)} tokens, {steps} decode steps, {rounds} rounds, {torch.get_num_threads()} threads")
    print("| batch | weights | weight MB | prefill ms | decode ms/step | tok/s | decode vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for batch in batches:
            times: dict[str, list[tuple[float, float]]] = {m: [] for m in runners}
            for _ in range(rounds + 1):  # the first round warms up
                for mode, runner in runners.items():
                    times[mode].append(_time_run(runner, prompt, batch, steps))
            base = statistics.median(d for _, d in times["bf16"][1:])
            for mode, samples in times.items():
                prefill = _median_ms([p for p, _ in samples[1:]])
                decode = statistics.median(d for _, d in samples[1:])
                print(f"| {batch} | {mode} | {runners[mode].weight_bytes / 1e6:.0f} | {prefill:.0f} | "
                      f"{decode * 1e3:.1f} | {batch / decode:.0f} | {base / decode:.2f}x |", flush=True)


def bench_linear(batches: list[int], rounds: int) -> None:
    shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
    print("| linear | rows | bf16 us | int8 us | int4 us | int4 PyTorch us | int8 vs bf16 | int4 vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for name, (n, k) in shapes.items():
            copies = 2 if name == "lm_head" else 30
            weights = [(torch.randn(n, k) * 0.05).to(torch.bfloat16) for _ in range(copies)]
            linears = {m: [make_linear(w, None, True, q) for w in weights] for m, q in MODES.items()}
            quant.VNNI_LINEARS = False  # PyTorch's int4 kernel, for comparison with the VNNI one
            linears["int4-pytorch"] = [make_linear(w, None, True, "int4") for w in weights]
            quant.VNNI_LINEARS = True
            for rows in batches:
                x = torch.randn(rows, k).to(torch.bfloat16)
                samples: dict[str, list[float]] = {m: [] for m in linears}
                for _ in range(rounds):
                    for mode, group in linears.items():
                        samples[mode].append(_time_all(group, x) / copies)
                us = {m: statistics.median(s) * 1e6 for m, s in samples.items()}
                print(f"| {name} | {rows} | {us['bf16']:.0f} | {us['int8']:.0f} | {us['int4']:.0f} | "
                      f"{us['int4-pytorch']:.0f} | "
                      f"{us['bf16'] / us['int8']:.2f}x | {us['bf16'] / us['int4']:.2f}x |", flush=True)


def _time_all(group: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    for linear in group:
        linear(x)
    started = time.perf_counter()
    for linear in group:
        linear(x)
    return time.perf_counter() - started


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(mode: str, owned: bool) -> None:
    """One measurement (run in a fresh process): RSS after load and after a 16-sequence run."""
    tokenizer, model = initialize(device="cpu", dtype="bfloat16", compile=False, quantization="none")
    if owned:
        mark_engine_owned(model)
    runner = LlamaRunner(model, max_slots=16, max_context=1024, quantization=MODES[mode])
    loaded = _rss_mb()
    with torch.inference_mode():
        _time_run(runner, _prompt_ids(tokenizer), 16, 64)
    print(json.dumps({"mode": mode, "owned": owned, "after_load_mb": loaded, "after_run_mb": _rss_mb()}))


def bench_rss() -> None:
    print("| weights | engine owns the model (HF copies freed) | RSS after load MB | after a 16-sequence run MB |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        for owned in (False, True):
            out = subprocess.run([sys.executable, __file__, "rss-child", mode, str(int(owned))],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"| {mode} | {'yes' if owned else 'no'} | {row['after_load_mb']:.0f} | {row['after_run_mb']:.0f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="step", choices=("step", "linear", "rss", "rss-child"))
    parser.add_argument("args", nargs="*")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    batches = [int(b) for b in options.batch.split(",")]
    if options.what == "step":
        bench_step(batches, options.steps, options.rounds)
    elif options.what == "linear":
        bench_linear(batches, options.rounds * 3)
    elif options.what == "rss":
        bench_rss()
    else:
        rss_child(options.args[0], options.args[1] == "1")


if __name__ == "__main__":
    main()
