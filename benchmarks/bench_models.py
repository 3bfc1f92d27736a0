#!/usr/bin/env python3
"""Models scenario (issue 22): tok/s of the engine's runners on tiny random models of several families.

For each family (``tiny_models.py``: 2 layers, hidden 64, with the embedded model's tokenizer and
its vocabulary, saved to a temp folder) and for the embedded SmolLM2 itself:

1. in-process, no HTTP: a ``BatchEngine`` (``engine_microbench``'s closed loop, EOS ignored so every
   request generates ``--max-tokens``) with the runner forced to GenericRunner, then HFRunner
   (and LlamaRunner for the embedded model), at each ``--levels`` concurrency;
2. ``--http``: our server (auto runner: LlamaRunner for the embedded model) against ``transformers serve
   --continuous-batching`` on the same folder and dtype, through ``bench_serving``'s client.

The table goes to stdout and to ``benchmarks/results/bench_models_<time>.md``. The machine may be
shared: ratios within one run are what to read, not absolute tok/s.

    .venv/bin/python benchmarks/bench_models.py                      # in-process, 1 and 16 concurrent
    .venv/bin/python benchmarks/bench_models.py --http               # plus ours vs transformers serve
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_server.engine.heap_policy import apply_server_heap_policy  # noqa: E402
from llm_server.engine.wait_policy import apply_server_wait_policy  # noqa: E402

apply_server_wait_policy()  # the in-process runs run as a server process does
apply_server_heap_policy()

import tiny_models  # noqa: E402

DEFAULT_FAMILIES = "llama,qwen3,gemma3,phi3,olmo2,qwen3_moe,gpt_oss"
EMBEDDED = "embedded"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def export_folders(families: list[str], workdir: Path, dtype: str) -> dict[str, Path]:
    """family -> HF folder (the tiny model saved with the embedded tokenizer); the embedded model's too."""
    import torch
    from transformers import AutoTokenizer

    from llm_server.helper_functionality.model_loading import export_embedded_model

    embedded = export_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    folders = {EMBEDDED: embedded}
    for family in families:
        reason = tiny_models.available(family)
        if reason is not None:
            print(f"skipping {family}: {reason}", file=sys.stderr)
            continue
        model = tiny_models.build(family, vocab_size=len(tokenizer), dtype=getattr(torch, dtype))
        model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        folder = workdir / family
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


def engine_levels(folder: Path, runner: str, dtype: str, levels: list[int], max_tokens: int,
                  rounds: int) -> tuple[str, dict[int, float]]:
    """(runner class, {concurrency: tok/s}) of an in-process engine serving ``folder``."""
    import torch
    from engine_microbench import run_level
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_server.engine.batch_engine import BatchEngine, EngineConfig
    from llm_server.engine.llama_weights import mark_engine_owned
    from llm_server.engine.model_setup import RUNNER_ATTR

    def load() -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        mark_engine_owned(model)
        setattr(model, RUNNER_ATTR, runner)
        return tokenizer, model

    engine = BatchEngine.from_loader(load, folder.name, EngineConfig(max_running=max(levels)))
    engine.start()
    engine.eos_ids = frozenset()
    try:
        asyncio.run(run_level(engine, engine.tokenizer, 1, 1, 4))  # warm-up
        result = {n: asyncio.run(run_level(engine, engine.tokenizer, n, n * rounds, max_tokens))["tok_s"]
                  for n in levels}
        return engine.runner_name, result
    finally:
        engine.shutdown(timeout_s=30)


def http_levels(folder: Path, dtype: str, levels: list[int], max_tokens: int,
                ours_set: list[str], rounds: int = 2, fresh: bool = False) -> dict[str, dict[int, float]]:
    """{"ours" | "peer": {concurrency: tok/s}} over HTTP (bench_serving's client and servers).

    Ours runs through ``servebench.peers.ours_spec``'s entry (``start_llm_server``'s function imported
    from the path) with this checkout first on ``PYTHONPATH`` (not the venv's console script, which
    may belong to another checkout); ``ours_set`` overrides ``model.KEY`` of its model_config.yaml."""
    import dataclasses

    from servebench import peers
    from servebench.client import drive
    from servebench.servers import REPO_ROOT, free_port, running

    counts = [max(4, rounds * n) for n in levels]  # ``rounds`` requests per worker, as in-process
    workdir = Path(tempfile.mkdtemp(prefix="bench_models_http."))
    found: dict[str, dict[int, float]] = {}
    try:
        for name in ("peer", "ours"):
            port = free_port()
            if name == "ours":
                peers.write_our_config(workdir / "config", str(folder), dtype, port, max(levels), max_tokens, ours_set)
                spec = peers.ours_spec(workdir / "config", port)
                # start_llm_server's function from this checkout (ours_spec's entry imports it from the path)
                path = os.pathsep.join(p for p in (str(REPO_ROOT), spec.env.get("PYTHONPATH", "")) if p)
                spec = dataclasses.replace(spec, env={**spec.env, "PYTHONPATH": path})
            else:
                spec = peers.peer_spec(folder, dtype, port)
            with running(spec, workdir) as server:
                rows = asyncio.run(drive(spec, server.proc.pid, levels, counts, max_tokens, 64.0, 0, fresh=fresh))
            found[name] = {r.concurrency: r.tokens_per_s for r in rows}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return found


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def render(rows: list[dict[str, Any]], levels: list[int], http: bool) -> str:
    top = levels[-1]
    head = ["model", "runner"] + [f"tok/s at {n}" for n in levels] + [f"HFRunner tok/s at {top}", "x HFRunner"]
    if http:
        head += [f"HTTP ours at {top}", f"transformers serve at {top}", "x transformers serve"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        ours, hf = row["ours"], row["hf"]
        cells = [row["model"], row["runner"]] + [f"{ours[n]:.1f}" for n in levels]
        cells += [f"{hf[top]:.1f}", ratio(ours[top], hf[top])]
        if http:
            web = row.get("http", {})
            mine, peer = web.get("ours", {}).get(top), web.get("peer", {}).get(top)
            cells += [f"{mine:.1f}" if mine else "-", f"{peer:.1f}" if peer else "-", ratio(mine, peer)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma-separated (default {DEFAULT_FAMILIES})")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per worker at each level (in-process and over HTTP)")
    parser.add_argument("--http", action="store_true", help="also ours vs transformers serve over HTTP")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded SmolLM2")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="over HTTP, every request a prompt never sent before (bench_serving's option): no "
                             "server reuses a repeated prompt's KV")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override model_config.yaml's model.KEY for our HTTP server, e.g. "
                             "optimizations.quantization=null (repeatable)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="bench_models."))
    rows: list[dict[str, Any]] = []
    try:
        folders = export_folders([f for f in args.families.split(",") if f], workdir, args.dtype)
        for name, folder in folders.items():
            if name == EMBEDDED and args.no_embedded:
                continue
            runners = ["generic", "hf"] + (["llama"] if name == EMBEDDED else [])
            measured = {r: engine_levels(folder, r, args.dtype, levels, args.max_tokens, args.rounds) for r in runners}
            for runner in runners:
                if runner == "hf":
                    continue
                row = {"model": name, "runner": measured[runner][0], "ours": measured[runner][1],
                       "hf": measured["hf"][1]}
                if args.http and runner == ("llama" if name == EMBEDDED else "generic"):  # what the server picks
                    row["http"] = http_levels(folder, args.dtype, levels, args.max_tokens, args.ours_set,
                                              args.rounds, args.fresh_prompts)
                rows.append(row)
                print(render(rows[-1:], levels, args.http).splitlines()[-1], flush=True)
                save(args, started, rows, levels, partial=True)  # kept if a later model fails
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + save(args, started, rows, levels, partial=False))


def save(args: argparse.Namespace, started: float, rows: list[dict[str, Any]], levels: list[int], partial: bool) -> str:
    """Write the table to ``bench_models_<start>[_partial].md`` (the partial file goes once the run ends)."""
    settings = f" (ours over HTTP with {', '.join(args.ours_set)})" if args.ours_set else ""
    settings += " (--fresh-prompts: no prompt repeats over HTTP)" if args.fresh_prompts else ""
    text = (f"bench_models{settings}: {args.dtype}, {args.max_tokens} new tokens per request, {args.rounds} "
            f"requests per worker, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
            f"{time.time() - started:.0f} s; "
            f"{machine()}\n\n{render(rows, levels, args.http)}\n")
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"bench_models_{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}"
    stem = stem.with_name(stem.name + ("_fresh" if args.fresh_prompts else ""))
    partial_file = Path(f"{stem}_partial.md")
    if partial:
        partial_file.write_text(text)
    else:
        partial_file.unlink(missing_ok=True)
        Path(f"{stem}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
