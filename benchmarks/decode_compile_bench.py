#!/usr/bin/env python3
"""Does ``torch.compile`` of a decode step's layers beat eager on this CPU? (issue 21, item 2)

Two ``LlamaRunner`` s of the embedded model (bf16, ``--mode`` weights, batch 1): one eager, one whose
30 decoder layers run through ``torch.compile(dynamic=True)`` for single-token steps (optionally
with Inductor's C++ wrapper, the AOTInductor code path). The cache views are made inside the
compiled region (passed in as inputs, AOTAutograd's view-input merging fails), and both caches are
pinned at one capacity so that a longer key length does not recompile. Prints the compile time,
the logits' difference, the eager and compiled ms per step (rounds interleaved; compare within one
run), and with ``--profile`` the compiled step's ops.

    .venv/bin/python benchmarks/decode_compile_bench.py --mode auto [--cpp-wrapper] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.weight_bench import MODES, _prompt_ids  # noqa: E402
from llm_server.engine.llama_runner import LlamaRunner, _rms_norm  # noqa: E402
from llm_server.engine.runner import KVHandle  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402

CAPACITY_NEEDED = 500  # the caches are fitted once to this many positions, then pinned


def layers(runner: LlamaRunner, x: torch.Tensor, step: Any) -> torch.Tensor:
    """The decoder layers of one forward (what the compiled region holds)."""
    if step.keys is not None and step.keys.dim() == 0:  # compiled: the cache views are made here
        lo, n = step.lo, x.shape[0]
        step = dataclasses.replace(step, keys=runner._cache.keys[:, lo : lo + n].flatten(1, 2),
                                   values=runner._cache.values[:, lo : lo + n].flatten(1, 2))
    for index, layer in enumerate(runner._layers):
        x = x + runner._attention(index, layer, _rms_norm(x, layer.ln1, runner._eps), step)
        x = x + runner._mlp(layer, _rms_norm(x, layer.ln2, runner._eps))
    return x


def compile_decode(runner: LlamaRunner) -> None:
    """Route ``runner`` 's single-token steps through a compiled copy of :func:`layers`."""
    compiled = torch.compile(lambda x, step: layers(runner, x, step), dynamic=True)

    def run(lo: int, padded: list[list[int]], starts: list[int], lengths: list[int],
            every: bool = False) -> torch.Tensor:
        step = runner._step_inputs(lo, padded, starts)
        x = F.embedding(step.tokens, runner._embed)
        if len(padded[0]) == 1 and not every:
            marker = torch.zeros(())
            x = compiled(x, dataclasses.replace(step, keys=marker, values=marker))
        else:
            x = layers(runner, x, step)
        return runner._last_logits(x, lengths)

    runner._run = run  # type: ignore[method-assign]


def time_steps(runner: LlamaRunner, handle: KVHandle, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        runner.forward([handle], [[5]])
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="auto", choices=sorted(MODES))
    parser.add_argument("--cpp-wrapper", action="store_true", help="Inductor's C++ wrapper (cpp_wrapper=True)")
    parser.add_argument("--profile", action="store_true", help="print the compiled step's ops")
    options = parser.parse_args()
    if options.cpp_wrapper:
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    tokenizer, model = initialize(device="cpu", dtype="bfloat16", compile=False, quantization="none")
    prompt = _prompt_ids(tokenizer)
    eager, compiled = (LlamaRunner(model, max_slots=1, max_context=1024, quantization=MODES[options.mode])
                       for _ in range(2))
    compile_decode(compiled)
    with torch.inference_mode():
        handles = {id(r): r.open() for r in (eager, compiled)}
        for runner in (eager, compiled):
            runner.forward([handles[id(runner)]], [prompt])
            runner._cache.fit(CAPACITY_NEEDED)
            runner._cache.fit = lambda needed: None  # type: ignore[method-assign]  # pinned: no recompile
        started = time.perf_counter()
        a = eager.forward([handles[id(eager)]], [[7]])
        b = compiled.forward([handles[id(compiled)]], [[7]])
        print(f"capacity {compiled._cache.capacity}; compile + 1 step: {time.perf_counter() - started:.1f} s")
        print(f"max |logits diff| {float((a - b).abs().max()):.3f}; same argmax: {bool(a.argmax() == b.argmax())}")
        time_steps(compiled, handles[id(compiled)], 8)  # warm-up
        samples: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(5):
            samples["eager"].append(time_steps(eager, handles[id(eager)], 32))
            samples["compiled"].append(time_steps(compiled, handles[id(compiled)], 32))
        print(f"mode={options.mode} cpp_wrapper={options.cpp_wrapper}: "
              + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms/step" for k, v in samples.items()))
        if options.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_steps(compiled, handles[id(compiled)], 4)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
