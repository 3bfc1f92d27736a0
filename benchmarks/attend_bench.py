"""The fused decode attention kernel alone (cpu_kernels.cpp ``attend``): one query row, long context.

Builds each given kernel source (default: the package's) into /tmp and times ``attend`` for one
decode row of the embedded model's shape (9 query heads, 3 kv heads, head dim 64, bf16, a slot
cache of 8192 positions) over ``CTX`` positions, on ``LAYERS`` distinct caches (30: out of the CPU
caches, as in a real step; 1: in cache), the variants interleaved for ``REPS`` rounds. Prints the
median microseconds per layer (each call includes ~10 us of Python and ctypes).

    CTX=1000 .venv/bin/python benchmarks/attend_bench.py old.cpp llm_server/engine/cpu_kernels.cpp
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GOMP_SPINCOUNT", "50000")

import torch  # noqa: E402

from llm_server.engine import cpu_kernels  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 9, 3, 64, 8192


def build(source: Path) -> cpu_kernels.CpuKernels:
    """The kernels of ``source``, built with the package's flags into /tmp (once per source text)."""
    library = Path(f"/tmp/attend_bench_{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}.so")
    if not library.exists():
        cpu_kernels.SOURCE = source
        cpu_kernels._build(library)
    return cpu_kernels.CpuKernels(ctypes.CDLL(str(library)))


def main() -> None:
    sources = sys.argv[1:] or [str(cpu_kernels.SOURCE)]
    variants = {name: build(Path(name)) for name in sources}
    context, layers, reps = (int(os.environ.get(k, d)) for k, d in (("CTX", "1000"), ("LAYERS", "30"), ("REPS", "10")))
    torch.manual_seed(0)
    caches = [(torch.randn(1, KV_HEADS, HEAD_DIM, CAPACITY).bfloat16(),
               torch.randn(1, KV_HEADS, CAPACITY, HEAD_DIM).bfloat16()) for _ in range(layers)]
    q = torch.randn(1, 1, HEADS, HEAD_DIM).bfloat16()
    positions = torch.tensor([[context - 1]])
    reference = None
    for name, kernels in variants.items():
        out = kernels.attend(q, *caches[0], positions, KV_HEADS, 0).float()
        reference = out if reference is None else reference
        print(f"{name}: max difference from the first variant {(out - reference).abs().max().item():.2e}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, kernels in variants.items():
            started = time.perf_counter()
            for _ in range(3):
                for keys, values in caches:
                    kernels.attend(q, keys, values, positions, KV_HEADS, 0)
            times[name].append((time.perf_counter() - started) / (3 * layers) * 1e6)
    for name, samples in times.items():
        print(f"{name}: context {context}, {layers} layers: median {statistics.median(samples):.1f} us/layer, "
              f"min {min(samples):.1f}")


if __name__ == "__main__":
    main()
