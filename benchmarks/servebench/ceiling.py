"""The bandwidth ceiling of one decode stream (issue 21, "know the limit").

At one concurrent request a decode step reads every weight once (plus the KV cache of the tokens
so far), so no server can beat ``bandwidth / bytes per token`` tokens/s. Measured in the benchmark's
own run, before the servers start:

- **bandwidth**: one process, as many torch threads as the servers use, summing a 1 GiB float32
  tensor (a pure streaming read, far larger than the caches); the best of several passes. Taken
  before the servers start and again after they stop: on a shared host this probe moved from 29 to
  47 GB/s between runs minutes apart (2026-12-07), so the report shows the share against each probe
  and the ceiling from their mean;
- **a read of the weights' size**: the same sum over a tensor as large as the weights ours reads per
  token, repeated. Where the last-level cache holds most of that (an Intel Xeon whose KVM guest saw
  about 100 MB of L3, 2026-12-08), a decode step is served partly from cache and can beat the 1 GiB
  ceiling; the share against this read shows how close it comes to what that working set allows.
  On a host whose cache is much smaller than the weights the two reads agree;
- **bytes per token, ours**: ``LlamaRunner.weight_bytes`` of the configured weights (what a
  one-sequence step reads: the int4 copy in ``auto``) plus the KV cache of the mean context;
- **bytes per token, llama-server**: the GGUF's tensor bytes (its tied Q8_0 embedding is read once
  as the output matrix) plus its f16 KV cache of the same context.

Both measurements run in a child process (``python benchmarks/servebench/ceiling.py ...``), so the
benchmark process never imports torch nor holds the gigabyte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
STREAM_BYTES = 1 << 30


@dataclass
class Ceiling:
    """What the child measured; bytes per token without the KV cache (added per level)."""

    bandwidth_gbs: float
    threads: int
    ours_weight_bytes: int
    kv_bytes_per_position: int  # keys + values of one position, all layers (16-bit)
    gguf_tensor_bytes: int
    quantization: str
    later_bandwidth_gbs: float | None = None  # the probe again, after the servers
    weights_sized_gbs: float | None = None  # the read over a tensor of ours' weight bytes, repeated

    def probes(self) -> list[float]:
        """The streaming reads taken (before the servers, then after them when taken)."""
        return [self.bandwidth_gbs] + ([self.later_bandwidth_gbs] if self.later_bandwidth_gbs is not None else [])


def stream_bandwidth_gbs(threads: int, repeats: int = 5, nbytes: int | None = None) -> float:
    """GB/s of ``tensor.sum()`` over a float32 tensor of ``nbytes`` (default 1 GiB) with ``threads``
    torch threads (best pass)."""
    import torch

    torch.set_num_threads(threads)
    size = (nbytes or STREAM_BYTES) // 4
    data = torch.ones(size, dtype=torch.float32)
    data.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return size * 4 / best / 1e9


def runner_bytes(model_dir: str, dtype: str, quantization: str | None) -> tuple[int, int]:
    """(weight bytes a one-sequence decode step reads, KV bytes per cached position) of our runner."""
    from llm_server.engine.llama_runner import LlamaRunner
    from llm_server.engine.llama_weights import mark_engine_owned
    from llm_server.helper_functionality.model_loading import initialize

    _, model = initialize(device="cpu", model_id=model_dir, dtype=dtype, quantization=quantization or "none",
                          compile=False)
    mark_engine_owned(model)
    runner = LlamaRunner(model, max_slots=1, max_context=64)
    config: Any = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    per_position = 2 * int(config.num_hidden_layers) * kv_heads * head_dim * runner.dtype.itemsize
    return runner.weight_bytes, per_position


def gguf_tensor_bytes(path: str) -> int:
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(path).tensors)


def measure(model_dir: Path, gguf: Path, dtype: str, quantization: str | None, threads: int, env: dict[str, str],
            cwd: Path) -> Ceiling:
    """Run the measurements in a child process."""
    command = [sys.executable, str(HERE), str(model_dir), str(gguf), dtype, quantization or "none", str(threads)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=True).stdout
    return Ceiling(**json.loads(out.strip().splitlines()[-1]))


def measure_bandwidth(threads: int, env: dict[str, str], cwd: Path) -> float:
    """The streaming read alone, again, in a child process (GB/s)."""
    command = [sys.executable, str(HERE), "--bandwidth-only", str(threads)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["bandwidth_gbs"])


def configured_quantization(overrides: list[str], defaults_file: Path) -> str | None:
    """The quantization our server runs with: an ``--ours-set optimizations.quantization=...``, else the
    shipped model_config.yaml's."""
    import yaml

    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "optimizations.quantization":
            return None if yaml.safe_load(value) in (None, "none") else str(yaml.safe_load(value))
    shipped = yaml.safe_load(defaults_file.read_text())["model"]["optimizations"].get("quantization")
    return None if shipped is None else str(shipped)


def ceiling_rows(ceiling: Ceiling, positions: dict[str, float], tok_s: dict[str, float]) -> list[str]:
    """Markdown: per server, bytes per token at one concurrent, the ceiling and the share reached.
    ``positions``: mean cached positions during decoding (prompt + half the new tokens)."""
    weights = {"ours": ceiling.ours_weight_bytes, "llama-server": ceiling.gguf_tensor_bytes}
    probes = ceiling.probes()
    mean = sum(probes) / len(probes)
    read = " / ".join(f"**{gbs:.1f}**" for gbs in probes)
    sized = ceiling.weights_sized_gbs
    sized_header, sized_rule = (" share against a read of the weights' size |", "---:|") if sized else ("", "")
    lines = [
        "### Bandwidth ceiling at 1 concurrent (issue 21)",
        "",
        f"Streaming read (`tensor.sum()` of 1 GiB float32, {ceiling.threads} threads, best of 5), "
        f"{'before / after the servers' if len(probes) > 1 else 'before the servers'}: {read} GB/s; the ceiling "
        f"is from their mean, {mean:.1f} GB/s. Bytes per token = weights read by one decode step + KV cache of the "
        f"mean context ({ceiling.kv_bytes_per_position} B per position). Ours: `quantization: "
        f"{ceiling.quantization}`; llama-server: the GGUF's tensor bytes (Q4_1 layers, Q8_0 tied embedding).",
        "",
        "| server | weight MB / token | KV MB / token | ceiling tok/s | measured tok/s at 1 | share of ceiling "
        f"| share against each probe |{sized_header}",
        f"|---|---:|---:|---:|---:|---:|---:|{sized_rule}",
    ]
    for name, weight in weights.items():
        if name not in tok_s:
            continue
        kv = ceiling.kv_bytes_per_position * positions.get(name, 0.0)
        limit = mean * 1e9 / (weight + kv)
        each = " / ".join(f"{tok_s[name] * (weight + kv) / (gbs * 1e9):.0%}" for gbs in probes)
        against_sized = f" {tok_s[name] * (weight + kv) / (sized * 1e9):.0%} |" if sized else ""
        lines.append(f"| {name} | {weight / 1e6:.1f} | {kv / 1e6:.2f} | {limit:.0f} | {tok_s[name]:.1f} "
                     f"| {tok_s[name] / limit:.0%} | {each} |{against_sized}")
    notes = [f"A read of the weights' size ({ceiling.ours_weight_bytes / 1e6:.1f} MB, the same sum, best of 10) "
             f"reached **{sized:.1f}** GB/s: where it beats the 1 GiB read, the last-level cache holds part of "
             "a step's weights, and a server can pass the 1 GiB ceiling; the last column is the share "
             "against that read.", ""] if sized else []
    return [*lines, "", *notes]


def _child(argv: list[str]) -> None:
    if argv[:1] == ["--bandwidth-only"]:
        print(json.dumps({"bandwidth_gbs": stream_bandwidth_gbs(int(argv[1]))}))
        return
    parser = argparse.ArgumentParser()
    for name in ("model_dir", "gguf", "dtype", "quantization"):
        parser.add_argument(name)
    parser.add_argument("threads", type=int)
    args = parser.parse_args(argv)
    quantization = None if args.quantization == "none" else args.quantization
    bandwidth = stream_bandwidth_gbs(args.threads)  # first, before the model takes memory
    weight_bytes, per_position = runner_bytes(args.model_dir, args.dtype, quantization)
    weights_sized = stream_bandwidth_gbs(args.threads, repeats=10, nbytes=weight_bytes)
    print(json.dumps({"bandwidth_gbs": bandwidth, "weights_sized_gbs": weights_sized, "threads": args.threads,
                      "ours_weight_bytes": weight_bytes,
                      "kv_bytes_per_position": per_position, "gguf_tensor_bytes": gguf_tensor_bytes(args.gguf),
                      "quantization": args.quantization}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent.parent))  # the repository root: llm_server
    _child(sys.argv[1:])
