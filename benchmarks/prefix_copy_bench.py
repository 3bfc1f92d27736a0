#!/usr/bin/env python3
"""What a prefix-cache hit costs against the prefill it saves (in process, no HTTP).

It loads the embedded SmolLM2-135M-Instruct (or ``--model``) with ``initialize``, builds the
engine's ``LlamaRunner`` and, for each prompt length, times (median of ``--repeat``):

- prefill: one forward of the whole prompt into an empty slot;
- save: copying the prompt's full 16-token blocks out of the slot into a ``PrefixCache``;
- restore: copying them from the cache into a fresh slot (what an admission with a hit does);
- the remaining prefill of the last block (the tokens a hit still computes).

The KV bytes per token are printed too (keys + values, every layer). Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prefix_copy_bench.py --lengths 256,1000,2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The server's OpenMP wait policy (as engine_microbench.py), set before torch loads.
from llm_server.engine.wait_policy import apply_server_wait_policy  # noqa: E402

apply_server_wait_policy()

import torch  # noqa: E402

from llm_server.engine.llama_runner import LlamaRunner  # noqa: E402
from llm_server.engine.prefix_cache import PrefixCache  # noqa: E402
from llm_server.engine.runner import KVHandle  # noqa: E402
from llm_server.helper_functionality.model_loading import initialize  # noqa: E402


def timed(action: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``action`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(runner: LlamaRunner, length: int, repeat: int) -> dict[str, float]:
    """Seconds of prefill / save / restore / tail prefill for a ``length``-token prompt."""
    cache = runner.slot_cache
    ids = [(i * 7919) % 40000 + 100 for i in range(length)]

    def prefill() -> KVHandle:
        handle = runner.open()
        runner.forward([handle], [ids])
        return handle

    def cycle() -> None:
        runner.release(prefill())

    prefill_s = timed(cycle, repeat)
    source = prefill()

    def save() -> None:
        PrefixCache(length * 2).save(cache, source, ids, room=length * 2)

    save_s = timed(save, repeat)
    prefix = PrefixCache(length * 2)
    prefix.save(cache, source, ids, room=length * 2)

    def restore() -> None:
        handle = KVHandle()
        prefix.restore(cache, handle, prefix.acquire(ids), length)
        cache.release(handle)

    restore_s = timed(restore, repeat)
    hit = (length - 1) // prefix.block_size * prefix.block_size

    def tail() -> None:
        handle = KVHandle()
        prefix.restore(cache, handle, prefix.acquire(ids), length)
        runner.forward([handle], [ids[hit:]])
        runner.release(handle)

    tail_s = timed(tail, repeat)
    runner.release(source)
    return {"prefill": prefill_s, "save": save_s, "restore": restore_s, "hit_total": tail_s, "hit_tokens": hit}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id for initialize() (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="256,1000,2000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    _, model = initialize(device="cpu", model_id=args.model, dtype=args.dtype, compile=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    with torch.inference_mode():
        runner = LlamaRunner(model, max_slots=4, max_context=max(lengths) + 64)
        layers, _, kv_heads, head_dim, _ = runner.slot_cache.keys.shape
        per_token = layers * kv_heads * head_dim * 2 * runner.dtype.itemsize
        print(f"KV bytes per token: {per_token} ({runner.dtype}); torch threads: {torch.get_num_threads()}")
        print("| prompt tokens | KV MB | prefill ms | save (copy out) ms | restore (copy in) ms | hit: restore + "
              "prefill of the rest ms | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for length in lengths:
            r = measure(runner, length, args.repeat)
            mb = r["hit_tokens"] * per_token / 1e6
            print(f"| {length} | {mb:.1f} | {r['prefill'] * 1e3:.1f} | {r['save'] * 1e3:.2f} | "
                  f"{r['restore'] * 1e3:.2f} | {r['hit_total'] * 1e3:.1f} | {r['prefill'] / r['hit_total']:.1f}x |")


if __name__ == "__main__":
    main()
