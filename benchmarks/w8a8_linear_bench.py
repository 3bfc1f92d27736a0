#!/usr/bin/env python3
"""W8A8 (int8 weights and int8 activations) against the runner's oneDNN-packed bf16 linear (issue 21).

Issue 21, item 1 asks whether int8 activations with AVX-512 VNNI (as llama.cpp's Q8 dot products do)
beat bf16 for the large-row calls (prefill, decode steps of 16-32 sequences). This times one
linear of the embedded model's shapes (576 -> 1536 q/k/v, 576 -> 3072 gate/up, 1536 -> 576 down) in
eager PyTorch, for several row counts:

- ``bf16``: the oneDNN-packed bf16 weight the runner uses (``mkldnn._linear_pointwise``);
- ``w8a8``: per-output-channel symmetric int8 weights, per-row symmetric int8 activations
  quantized on the fly, ``torch._int_mm`` (int32 accumulate), then both scales applied;
- ``int_mm``: the int8 matmul alone (no activation quantization), the bound for an eager W8A8.

It also prints each one's error relative to a float32 matmul. Nothing here needs the model.

    .venv/bin/python benchmarks/w8a8_linear_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

SHAPES = ((576, 1536), (576, 3072), (1536, 576))  # (in, out) of the embedded model's linears
ROWS = (1, 9, 16, 32, 64, 720)


def per_call_ms(call: Callable[[], torch.Tensor], repeats: int) -> float:
    """The mean of ``repeats`` calls after a warm-up, in milliseconds."""
    for _ in range(3):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e3


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([in, out] int8, [out] scales), symmetric per output channel."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(weight / scales[:, None]).to(torch.int8).t().contiguous(), scales


def w8a8(x: torch.Tensor, weight_q: torch.Tensor, weight_scales: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` with ``x`` quantized per row to int8 (the matmul in int32)."""
    xf = x.float()
    scales = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8).div_(127.0)
    x_q = torch.round(xf / scales).to(torch.int8)
    return torch._int_mm(x_q, weight_q).float().mul_(scales).mul_(weight_scales).to(x.dtype)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference).norm() / reference.norm())


def row(rows: int, fan_in: int, fan_out: int, repeats: int) -> str:
    weight = torch.randn(fan_out, fan_in) * 0.05
    x = torch.randn(rows, fan_in).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), None)
    weight_q, weight_scales = quantize_weight(weight)
    x_q = torch.randint(-127, 127, (rows, fan_in), dtype=torch.int8)

    def bf16() -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    bf16_ms = per_call_ms(bf16, repeats)
    w8a8_ms = per_call_ms(lambda: w8a8(x, weight_q, weight_scales), repeats)
    int_mm_ms = per_call_ms(lambda: torch._int_mm(x_q, weight_q), repeats)
    reference = torch.nn.functional.linear(x.float(), weight)
    return (f"| {rows} | {fan_in} -> {fan_out} | {bf16_ms:.3f} | {w8a8_ms:.3f} | {int_mm_ms:.3f} | "
            f"{bf16_ms / w8a8_ms:.2f}x | {relative_error(bf16(), reference):.4f} | "
            f"{relative_error(w8a8(x, weight_q, weight_scales), reference):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    options = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(options.threads)
    print(f"{options.threads} threads, torch {torch.__version__}, {options.repeats} calls each")
    print("| rows | linear | bf16 packed ms | w8a8 ms | int_mm alone ms | bf16 / w8a8 | rel. error bf16 "
          "| rel. error w8a8 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in ROWS:
        for fan_in, fan_out in SHAPES:
            print(row(rows, fan_in, fan_out, options.repeats), flush=True)


if __name__ == "__main__":
    main()
