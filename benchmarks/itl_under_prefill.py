#!/usr/bin/env python3
"""ITL of running streams while a long prompt arrives: our server with the step token budget off
(``step_token_budget: 0``, the engine before issue 21) and on, and optionally llama-server, in one run.

Each server in turn (never two at once) serves the embedded SmolLM2 model over HTTP. Per round,
``--streams`` (16) streaming chat requests of ``--stream-tokens`` greedy tokens start; once every
one is streaming and ``--settle-s`` has passed, a ~``--long-tokens`` (1,000) token prompt arrives
(``--long-max-tokens`` new tokens; each round's prompt is different, so no prefix cache helps).
Measured client side with the official ``openai`` AsyncOpenAI client:

- window: from the long prompt being sent to its first content chunk (its TTFT);
- ITL in the window: every gap between two consecutive content chunks of a running stream that
  overlaps the window (the stall included), p50 / p99 / max over all streams and rounds;
- steady ITL: the same gaps before the long prompt was sent (the streams' ITL without it).

Run from the repository root (results saved under ``benchmarks/results/itl_under_prefill_*.md|json``)::

    .venv/bin/python benchmarks/itl_under_prefill.py                              # budget 0 vs 512
    .venv/bin/python benchmarks/itl_under_prefill.py --budgets 0,256,512 \\
        --llama-server /work/llama-build/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servebench import peers, report  # noqa: E402
from servebench.client import PROMPTS, SYSTEM_MESSAGE, percentile  # noqa: E402
from servebench.servers import REPO_ROOT, ServerSpec, free_port, running  # noqa: E402

log = logging.getLogger("itl_under_prefill")

WORDS = ("river mountain garden window silver candle market ocean forest letter village engine "
         "winter summer bridge castle dragon cooking history planet music teacher doctor travel "
         "library morning evening harbor island desert coffee bakery painter soldier museum").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--budgets", default="0,512",
                        help="our step_token_budget values, one server each (0 = off, the old engine)")
    parser.add_argument("--streams", type=int, default=16, help="running streams (default 16)")
    parser.add_argument("--stream-tokens", type=int, default=200, help="new tokens per stream (default 200)")
    parser.add_argument("--long-tokens", type=int, default=1000, help="long prompt length in tokens (approx.)")
    parser.add_argument("--long-max-tokens", type=int, default=16, help="new tokens of the long request")
    parser.add_argument("--rounds", type=int, default=3, help="long-prompt arrivals per server (default 3)")
    parser.add_argument("--settle-s", type=float, default=1.0, help="seconds of steady decoding before it arrives")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--llama-server", default=None, metavar="PATH", help="also run llama-server (its binary)")
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args(argv)


@dataclass
class Stream:
    chunks: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    prompt_tokens: int | None = None
    error: str | None = None


async def stream_chat(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int,
                      out: Stream, started: asyncio.Event | None = None) -> None:
    """One greedy streaming chat completion; every content chunk's arrival time in ``out``."""
    try:
        response = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})  # fmt: skip
        async for chunk in response:
            choices = chunk.choices or []
            # a token chunk, or the end of a reply whose first token was the end (no content at all)
            if any(c.delta is not None and c.delta.content for c in choices) or (
                    not out.chunks and any(c.finish_reason for c in choices)):
                out.chunks.append(time.perf_counter())
                if started is not None and len(out.chunks) >= 3:
                    started.set()
            if chunk.usage is not None:
                out.prompt_tokens = chunk.usage.prompt_tokens
    except Exception as exc:  # noqa: BLE001 - reported
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    if started is not None:
        started.set()


def long_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return f"Round {seed}. Summarize this text: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def calibrate(client: Any, model: str, target: int) -> int:
    """Words of filler giving a ~``target``-token prompt (measured with a throwaway seed's text)."""
    words = target
    for _ in range(2):
        probe = Stream()
        await stream_chat(client, model, [{"role": "user", "content": long_text(words, 10_000 + words)}], 1, probe)
        if probe.prompt_tokens is None:
            raise RuntimeError(f"calibration got no usage: {probe.error}")
        words = max(1, round(words * target / probe.prompt_tokens))
    return words


def chat(index: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]


async def one_round(client: Any, model: str, args: argparse.Namespace, words: int, seed: int) -> dict[str, Any]:
    """``streams`` running streams, then the long prompt; the window's gaps and the long TTFT."""
    streams = [Stream() for _ in range(args.streams)]
    started = [asyncio.Event() for _ in streams]
    tasks = [asyncio.create_task(stream_chat(client, model, chat(i), args.stream_tokens, s, e))
             for i, (s, e) in enumerate(zip(streams, started, strict=True))]
    for event in started:
        await event.wait()
    await asyncio.sleep(args.settle_s)
    long = Stream()
    sent = time.perf_counter()
    await stream_chat(client, model, [{"role": "user", "content": long_text(words, seed)}], args.long_max_tokens, long)
    await asyncio.gather(*tasks)
    if long.error or not long.chunks:
        raise RuntimeError(f"the long request failed: {long.error}")
    first = long.chunks[0]
    window, steady, late = [], [], 0
    for s in streams:
        if s.error:
            raise RuntimeError(f"a stream failed: {s.error}")
        late += int(s.chunks[-1] < first)  # finished before the long prompt's first token
        for a, b in zip(s.chunks, s.chunks[1:], strict=False):
            if b > sent and a < first:
                window.append(b - a)
            elif b <= sent and a >= sent - args.settle_s:
                steady.append(b - a)
    return {"ttft_s": first - sent, "long_prompt_tokens": long.prompt_tokens, "window_gaps_s": window,
            "steady_gaps_s": steady, "streams_done_before_first_token": late}


async def measure(spec: ServerSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=spec.base_url, api_key=spec.api_key, timeout=600, max_retries=0)
    try:
        model = (await client.models.list()).data[0].id
        await stream_chat(client, model, chat(0), 8, Stream())  # warm-up
        words = await calibrate(client, model, args.long_tokens)
        return [await one_round(client, model, args, words, seed) for seed in range(args.rounds)]
    finally:
        await client.close()


def our_spec(args: argparse.Namespace, weights: peers.Weights, workdir: Path, budget: int) -> ServerSpec:
    config_dir = workdir / f"config-{budget}"
    port = free_port()
    peers.write_our_config(config_dir, str(weights.hf_folder), args.dtype, port, 64,
                           max(args.stream_tokens, args.long_max_tokens), [])
    path = config_dir / "server_config.yaml"
    config = yaml.safe_load(path.read_text())
    config["server"]["engine"]["step_token_budget"] = budget
    config["server"]["engine"]["max_total_tokens"] = max(32768, 64 * (args.long_tokens + 64))
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return peers.ours_spec(config_dir, port)


def summarize(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    window = [g for r in rounds for g in r["window_gaps_s"]]
    steady = [g for r in rounds for g in r["steady_gaps_s"]]
    ttft = [r["ttft_s"] for r in rounds]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {"server": name, "steady_itl_p50_ms": ms(percentile(steady, 50)),
            "window_itl_p50_ms": ms(percentile(window, 50)), "window_itl_p99_ms": ms(percentile(window, 99)),
            "window_itl_max_ms": ms(max(window, default=None)), "window_gaps": len(window),
            "long_ttft_ms": [ms(t) for t in ttft], "long_ttft_p50_ms": ms(percentile(ttft, 50)),
            "long_prompt_tokens": [r["long_prompt_tokens"] for r in rounds],
            "streams_done_early": sum(r["streams_done_before_first_token"] for r in rounds)}


def render(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, str], loads: list[str]) -> str:
    lines = [f"# ITL of {args.streams} running streams while a ~{args.long_tokens}-token prompt arrives",
             "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU {info.get('cpu')}, {info.get('nproc')} "
             f"cores; {args.dtype} (ours), Q4_1 GGUF (llama-server); {args.rounds} rounds per server; streams of "
             f"{args.stream_tokens} tokens, the long request {args.long_max_tokens}; load average at each start: "
             f"{', '.join(loads)}.", "",
             "| server | steady ITL p50 | ITL p50 in the window | ITL p99 | max gap | gaps | long prompt TTFT "
             "(each round) | prompt tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['steady_itl_p50_ms']} ms | {r['window_itl_p50_ms']} ms | "
                     f"{r['window_itl_p99_ms']} ms | {r['window_itl_max_ms']} ms | {r['window_gaps']} | "
                     f"{r['long_ttft_p50_ms']} ms ({', '.join(map(str, r['long_ttft_ms']))}) | "
                     f"{', '.join(map(str, r['long_prompt_tokens']))} |")
    lines += ["", "Window: from sending the long prompt to its first content chunk. `python "
              + " ".join(sys.argv) + "`"]
    return "\n".join(lines) + "\n"


def run_servers(args: argparse.Namespace, workdir: Path, loads: list[str]) -> list[dict[str, Any]]:
    weights = peers.embedded_weights()
    plan: list[tuple[str, ServerSpec]] = []
    for budget in (int(b) for b in args.budgets.split(",") if b.strip()):
        name = f"ours, step_token_budget {budget}" + (" (off: before)" if budget == 0 else "")
        plan.append((name, our_spec(args, weights, workdir, budget)))
    if args.llama_server:
        slots = args.streams + 1
        spec = peers.llama_spec(args.llama_server, weights.gguf, free_port(), slots, args.long_tokens + 256,
                                args.llama_threads)
        plan.append((f"llama-server -np {slots} -t {args.llama_threads}", spec))
    rows = []
    for name, spec in plan:
        loads.append(f"{os.getloadavg()[0]:.2f}")
        with running(spec, workdir):
            rounds = asyncio.run(measure(spec, args))
        rows.append(summarize(name, rounds) | {"rounds": rounds})
        log.info("%s: %s", name, {k: v for k, v in rows[-1].items() if k != "rounds"})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="itl_under_prefill."))
    loads: list[str] = []
    try:
        rows = run_servers(args, workdir, loads)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = report.machine_info()
    text = render(args, rows, info, loads)
    print("\n" + text)
    if not args.no_save:
        stem = f"itl_under_prefill_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{stem}.md").write_text(text)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "rows": rows}
        (args.results_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
        log.info("saved %s.{md,json} in %s", stem, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

