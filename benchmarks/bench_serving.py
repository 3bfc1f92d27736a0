#!/usr/bin/env python3
"""Serving benchmark: this project's server against ``transformers serve --continuous-batching`` and,
when a binary is given, llama.cpp's ``llama-server`` on the package's own GGUF.

Both servers load the same weights (the embedded SmolLM2-135M-Instruct, dequantized to a Hugging Face
folder) at the same dtype, one server at a time, and are driven with the same concurrent streaming chat
requests through the OpenAI API (the official ``openai`` AsyncOpenAI client, ``stream=True``, greedy).
For each concurrency level the script measures aggregate output tokens/s, time to first token (TTFT)
p50/p95 and inter-token latency (ITL) p50, prints a markdown table with the ratios ours/peer and saves
it (plus the raw numbers as JSON) under ``benchmarks/results/``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_serving.py                      # both servers, bfloat16
    .venv/bin/python benchmarks/bench_serving.py --dtype bfloat16,float32
    .venv/bin/python benchmarks/bench_serving.py --only peer          # the peer alone
    .venv/bin/python benchmarks/bench_serving.py --llama-server /path/to/llama-server   # + llama.cpp

Ours and the peer load the same de-quantized folder at each dtype; llama-server loads the GGUF
itself (4-bit), once per run, with ``-np <highest concurrency> -c <np x ctx per slot> -t <cores>``.

The parts live in ``benchmarks/servebench/``: client (load + metrics), servers and peers (processes),
report. Definitions (all measured client-side):
- tokens/s: sum of completion tokens of a level / wall time from the level's first request to its last
  response byte (closed loop: ``concurrency`` workers, each sends its next request when one finishes).
- TTFT: request sent -> first chunk carrying content (a role-only first chunk does not count).
- ITL: per request, (last content chunk - first content chunk) / (completion tokens - 1); p50 over requests.
- completion tokens come from the stream's ``usage`` (both servers send it); the number of content chunks is
  the fallback. Requests that stopped before ``--max-tokens`` are counted and reported ("full" column).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servebench import ceiling, peers, report  # noqa: E402
from servebench.client import PROMPTS, SYSTEM_MESSAGE, LevelResult, drive  # noqa: E402,F401  (engine_microbench)
from servebench.servers import (  # noqa: E402
    REPO_ROOT,
    ServerSpec,
    free_port,
    process_group_rss_mb,
    running,
    wait_until_settled,
)

log = logging.getLogger("bench_serving")

#: Seconds to wait at least before each server: the host takes back the memory the last one freed
#: (servebench/servers.py, ``wait_until_settled``). Waiting alone (even 30 s) did not cure a slow
#: one-user level after the peer's exit; running ours first (``--order``) is what avoids it.
SETTLE_MIN_S = 10.0

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels (default 1,4,8,16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--dtype", default="bfloat16,float32",
                        help="bfloat16, float32, or both comma-separated (ours and the peer run once per dtype)")
    parser.add_argument("--requests-per-level", type=float, default=2.0,
                        help="requests per level = this x concurrency (at least --min-requests; default 2)")
    parser.add_argument("--min-requests", type=int, default=4, help="fewest requests in a level (default 4)")
    parser.add_argument("--settle-s", type=float, default=90.0,
                        help=f"before each server, wait at least {SETTLE_MIN_S:.0f} s and up to this long, until 5 s "
                        "in a row without CPU use or steal (0: no wait)")
    parser.add_argument("--only", choices=("ours", "peer", "both", "none"), default="both",
                        help="which of ours / transformers serve run (none: llama-server alone)")
    parser.add_argument("--order", choices=("ours-first", "peer-first"), default="ours-first",
                        help="which server runs first within a dtype (default ours: on a KVM guest with free page "
                        "reporting, a process started after the peer freed its 14 GB got memory that streamed "
                        "slowly, and our one-user level ran at 0.5-0.7x; docs/benchmarks.md, 2026-12-08)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="HF folder to serve (default: the embedded model, dequantized and cached)")
    parser.add_argument("--ours-model-id", default=None,
                        help="model id in our model_config.yaml (default: the same folder as the peer)")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra model_config.yaml setting under `model`, e.g. optimizations.compile=true")
    parser.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `transformers serve`, e.g. --peer-arg=--cb-num-blocks=128")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help=f"llama.cpp's llama-server binary (default ${peers.LLAMA_SERVER_ENV}); unset: not run")
    parser.add_argument("--llama-ctx-per-slot", type=int, default=1024,
                        help="llama-server context per parallel slot: -c = this x -np (default 1024)")
    parser.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1,
                        help="llama-server -t (default: the cores this process sees)")
    parser.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for llama-server, e.g. --llama-arg=--no-mmap")
    parser.add_argument("--max-other-cpu", type=float, default=0.25, metavar="CORES",
                        help="rerun a level when other processes used more CPU than this meanwhile (default 0.25)")
    parser.add_argument("--retries", type=int, default=2, help="most reruns of a disturbed level (default 2)")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="every request a prompt never sent before (its question opens with its number): "
                             "no server reuses a repeated prompt; they share only the system message")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the bandwidth-ceiling measurement (servebench/ceiling.py) before the servers")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing under results")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (server logs, config)")
    return parser.parse_args(argv)


def requests_per_level(args: argparse.Namespace) -> list[int]:
    return [max(args.min_requests, round(c * args.requests_per_level)) for c in parse_levels(args.concurrency)]


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 1,4,8,16")
    return levels


def _raise_keyboard_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def plan(args: argparse.Namespace, weights: peers.Weights, workdir: Path,
         llama_binary: str | None) -> list[tuple[str, str, Any]]:
    """(group, server name, spec factory) in run order: per dtype ours / peer, then llama-server once."""
    levels = parse_levels(args.concurrency)
    names = ["peer", "ours"] if args.order == "peer-first" else ["ours", "peer"]
    names = {"both": names, "none": []}.get(args.only, [args.only])
    runs: list[tuple[str, str, Any]] = []
    for dtype in (d.strip() for d in args.dtype.split(",") if d.strip()):
        for name in names:
            if name == "peer":
                runs.append((dtype, name, lambda port, d=dtype: peers.peer_spec(
                    args.model_dir or weights.hf_folder, d, port, args.peer_arg)))
            else:
                runs.append((dtype, name, lambda port, d=dtype: _ours(args, weights, workdir, d, port, max(levels))))
    if llama_binary:
        runs.append((report.GGUF_GROUP, "llama-server", lambda port: peers.llama_spec(
            llama_binary, weights.gguf, port, max(levels), args.llama_ctx_per_slot, args.llama_threads,
            args.llama_arg)))
    return runs


def _ours(args: argparse.Namespace, weights: peers.Weights, workdir: Path, dtype: str, port: int,
          max_running: int) -> ServerSpec:
    config_dir = workdir / f"config-{dtype}"
    peers.write_our_config(config_dir, args.ours_model_id or str(args.model_dir or weights.hf_folder), dtype,
                           port, max_running, args.max_tokens, args.ours_set)
    return peers.ours_spec(config_dir, port)


def run_all(args: argparse.Namespace, runs: list[tuple[str, str, Any]], workdir: Path,
            loads: list[str], commands: dict[str, str]) -> dict[str, dict[str, list[LevelResult]]]:
    """Each server in turn (never two at once): start, warm up, measure every level, stop."""
    levels, counts = parse_levels(args.concurrency), requests_per_level(args)
    results: dict[str, dict[str, list[LevelResult]]] = {}
    for group, name, make_spec in runs:
        spec = make_spec(free_port())
        commands.setdefault(name, peers.describe_command(spec))
        settled = wait_until_settled(args.settle_s, min_s=min(args.settle_s, SETTLE_MIN_S))
        log.info("machine quiet (no steal) after %.0f s; starting %s", settled, name)
        loads.append(f"{name} {group} {os.getloadavg()[0]:.2f} (after {settled:.0f} s waiting for a quiet machine)")
        with running(spec, workdir) as server:
            pid = server.proc.pid
            results.setdefault(group, {})[name] = asyncio.run(drive(
                spec, pid, levels, counts, args.max_tokens, args.max_other_cpu, args.retries,
                rss_mb=functools.partial(process_group_rss_mb, pid), fresh=args.fresh_prompts))
    return results


def measure_ceiling(args: argparse.Namespace, weights: peers.Weights) -> ceiling.Ceiling:
    """Memory bandwidth and bytes per token (servebench/ceiling.py), with the servers' thread count."""
    dtype = next(d.strip() for d in args.dtype.split(",") if d.strip())
    quantization = ceiling.configured_quantization(args.ours_set, REPO_ROOT / "llm_server" / "yaml_files"
                                                   / "model_config.yaml")
    measured = ceiling.measure(args.model_dir or weights.hf_folder, weights.gguf, dtype, quantization,
                               args.llama_threads, peers.server_env(), REPO_ROOT)
    log.info("streaming read %.1f GB/s (%d threads), %.1f GB/s over the weights' size; ours reads %.1f MB of "
             "weights per token, the GGUF %.1f MB", measured.bandwidth_gbs, measured.threads,
             measured.weights_sized_gbs or 0.0, measured.ours_weight_bytes / 1e6, measured.gguf_tensor_bytes / 1e6)
    return measured


def ceiling_table(args: argparse.Namespace, limit: ceiling.Ceiling,
                  results: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """The bandwidth-ceiling rows of the servers that ran 1 concurrent (ours: its first dtype)."""
    positions: dict[str, float] = {}
    tok_s: dict[str, float] = {}
    for by_server in results.values():
        for name, levels in by_server.items():
            one = [lv for lv in levels if lv.concurrency == 1]
            if one and name in ("ours", "llama-server") and name not in tok_s:
                tok_s[name] = one[0].tokens_per_s
                positions[name] = (one[0].prompt_tokens_mean or 0.0) + args.max_tokens / 2
    return ceiling.ceiling_rows(limit, positions, tok_s)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # run the finally blocks on `kill`
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    llama_binary = peers.llama_server_binary(args.llama_server)
    started = time.monotonic()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.2f on %s cores: other work will skew the numbers", os.getloadavg()[0],
                    os.cpu_count())
    weights = peers.embedded_weights()
    workdir = Path(tempfile.mkdtemp(prefix="bench_serving."))
    loads: list[str] = []
    commands: dict[str, str] = {}
    limit = None if args.no_ceiling else measure_ceiling(args, weights)
    try:
        results = run_all(args, plan(args, weights, workdir, llama_binary), workdir, loads, commands)
    except KeyboardInterrupt:
        log.error("interrupted; servers stopped")
        return 130
    finally:
        if args.keep_workdir:
            log.info("work dir kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    info = report.machine_info()
    text = report.render_report(args, results, info, args.model_dir or weights.hf_folder,
                                time.monotonic() - started, loads, commands, requests_per_level(args))
    if limit is not None:
        limit.later_bandwidth_gbs = ceiling.measure_bandwidth(limit.threads, peers.server_env(), REPO_ROOT)
        log.info("streaming read after the servers %.1f GB/s", limit.later_bandwidth_gbs)
        text += "\n" + "\n".join(ceiling_table(args, limit, results))
    print("\n" + text)
    if not args.no_save:
        servers = "-".join(sorted({name for by_server in results.values() for name in by_server}))
        settings = "".join(f"-{item.rpartition('.')[2].replace('=', '-')}" for item in args.ours_set)
        settings += "-fresh" if args.fresh_prompts else ""
        stem = f"bench_{servers}_{'-'.join(results)}{settings}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        report.save(args.results_dir, stem, text, args, results, info)
        log.info("saved %s.{md,json} in %s", stem, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
