#!/usr/bin/env python3
"""Multi-turn benchmark (issue 19): what a server does with text it has already seen.

Two scenarios, each through the OpenAI API (the official ``openai`` AsyncOpenAI client, streamed,
greedy, ``--max-tokens`` new tokens per request, 48 by default):

- **conversation**: a system message of about 1,000 tokens (reference notes), then ten user turns,
  each sent with the whole history (the assistant's earlier replies included), as every chat client
  does. Reported: TTFT and prompt tokens per turn.
- **shared**: sixteen users start together, each with the same ~1,000-token system prompt (a
  different one from the conversation's) and their own question, then a second turn with their
  history. Reported: TTFT p50 / p95 over all 32 requests and over the first wave.

Hit rate: prompt tokens served from the server's cache / prompt tokens, from each response's
``usage.prompt_tokens_details.cached_tokens`` where the server reports it ("n/r" where not).

Servers, one at a time, as ``bench_serving.py`` starts them (same weights, same dtype):
``ours`` (prefix caching on, the default), ``ours-nocache`` (``server.engine.prefix_caching: false``),
``peer`` (``transformers serve --continuous-batching``) and ``llama-server`` when a binary is given
(the package's 4-bit GGUF, ``-np 16 -c 16 x 2048``). Run from the repository root::

    .venv/bin/python benchmarks/bench_multiturn.py --llama-server /work/llama-build/llama-server
    .venv/bin/python benchmarks/bench_multiturn.py --servers ours,ours-nocache

Ours against llama-server in one run, the conversation only, turn by turn side by side (with a
row ``ours / llama-server``: below 1, ours answers first)::

    .venv/bin/python benchmarks/bench_multiturn.py --servers ours,llama-server --scenarios conversation \\
        --llama-server /work/llama-build/llama-server

``--turns N`` shortens the conversation (a smoke run). A request whose connection fails before any
text is sent once more (llama-server sometimes drops a kept-alive connection between turns); such a
turn is marked ``*``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servebench import peers, report  # noqa: E402
from servebench.client import percentile  # noqa: E402
from servebench.servers import REPO_ROOT, ServerSpec, free_port, running  # noqa: E402

log = logging.getLogger("bench_multiturn")

TOPICS = ("rivers", "mountains", "deserts", "forests", "oceans", "volcanoes", "glaciers", "islands",
          "lakes", "caves", "plains", "canyons", "wetlands", "reefs", "tundra", "savannas")  # fmt: skip
QUESTIONS = (
    "Summarise the notes about rivers in two sentences.",
    "Which notes mention water? List them.",
    "What is the most surprising fact in the notes?",
    "Rewrite note 3 for a ten-year-old.",
    "Compare the notes about deserts and forests.",
    "Which topic has the most notes?",
    "Write a short quiz question from note 7.",
    "What would you add to the notes about oceans?",
    "Give the notes a title.",
    "Thank you. Summarise our conversation.",
)


def notes(kind: str, count: int = 31) -> str:
    """About 1,000 tokens of deterministic reference notes (``kind`` makes two different texts)."""
    lines = [f"You are a {kind} assistant. Answer from these reference notes only."]
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        lines.append(f"Note {i + 1}: {topic} cover about {(i * 37) % 90 + 5} percent of region {i % 7 + 1}; "
                     f"survey {2000 + i} counted {(i * 131) % 900 + 100} sites.")
    return "\n".join(lines)


@dataclass
class Turn:
    """One streamed request's client-side result."""

    ttft_s: float | None
    prompt_tokens: int | None
    cached_tokens: int | None
    text: str
    error: str | None = None
    retried: bool = False


async def _chat_once(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> Turn:
    sent, first, text, usage = time.perf_counter(), None, "", None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})  # fmt: skip
        async for chunk in stream:
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    first = first or time.perf_counter()
                    text += choice.delta.content
            usage = chunk.usage or usage
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return Turn(None, None, None, text, f"{type(exc).__name__}: {exc}"[:200])
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return Turn(None if first is None else first - sent, getattr(usage, "prompt_tokens", None), cached, text)


async def chat(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> Turn:
    """One streamed request; sent again once if the connection failed before any text arrived (a
    kept-alive connection the server had closed: seen with llama-server), noted in ``retried``."""
    turn = await _chat_once(client, model, messages, max_tokens)
    if turn.error is not None and turn.error.startswith("APIConnectionError") and not turn.text:
        log.warning("connection error before any text (%s): sending the request again", turn.error)
        turn = await _chat_once(client, model, messages, max_tokens)
        turn.retried = True
    return turn


async def conversation(client: Any, model: str, max_tokens: int, system: str,
                       count: int = len(QUESTIONS)) -> list[Turn]:
    """``count`` turns (ten by default), each with the whole history."""
    messages = [{"role": "system", "content": system}]
    turns = []
    for question in QUESTIONS[:count]:
        messages.append({"role": "user", "content": question})
        turn = await chat(client, model, messages, max_tokens)
        turns.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return turns


async def shared(client: Any, model: str, max_tokens: int, system: str, users: int) -> list[list[Turn]]:
    """``users`` users start together with one system prompt; each sends two turns."""

    async def user(index: int) -> list[Turn]:
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"I am user {index}. " + QUESTIONS[index % len(QUESTIONS)]}]
        first = await chat(client, model, messages, max_tokens)
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": QUESTIONS[(index + 3) % len(QUESTIONS)]}]
        return [first, await chat(client, model, messages, max_tokens)]

    return list(await asyncio.gather(*(user(i) for i in range(users))))


def hit_rate(turns: Sequence[Turn]) -> float | None:
    """Cached / prompt tokens over the turns that report both; None when none does."""
    reported = [t for t in turns if t.cached_tokens is not None and t.prompt_tokens]
    if not reported:
        return None
    return sum(t.cached_tokens or 0 for t in reported) / sum(t.prompt_tokens or 0 for t in reported)


async def measure(spec: ServerSpec, args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=httpx.Timeout(900.0, connect=10.0))
    client = AsyncOpenAI(base_url=spec.base_url, api_key=spec.api_key, max_retries=0, http_client=http)
    try:
        model = (await client.models.list()).data[0].id
        await chat(client, model, [{"role": "user", "content": "Hello!"}], 8)  # warm-up
        started = time.perf_counter()
        talk = await conversation(client, model, args.max_tokens, notes("geography"), args.turns)
        users = []
        if "shared" in args.scenarios:
            users = await shared(client, model, args.max_tokens, notes("field survey"), args.users)
        log.info("%s done in %.0f s", spec.name, time.perf_counter() - started)
        return {"conversation": [asdict(t) for t in talk], "shared": [[asdict(t) for t in u] for u in users]}
    finally:
        await client.close()
        await http.aclose()


def server_specs(args: argparse.Namespace, weights: peers.Weights, workdir: Path) -> dict[str, Any]:
    """Server name -> spec factory (port) for the servers asked for."""

    def ours(port: int, caching: bool) -> ServerSpec:
        import yaml

        config_dir = workdir / f"config-{caching}"
        peers.write_our_config(config_dir, str(weights.hf_folder), args.dtype, port, args.users, args.max_tokens, [])
        path = config_dir / "server_config.yaml"
        document = yaml.safe_load(path.read_text())
        document["server"]["engine"]["prefix_caching"] = caching
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return peers.ours_spec(config_dir, port)

    factories = {
        "ours": lambda port: ours(port, True),
        "ours-nocache": lambda port: ours(port, False),
        "peer": lambda port: peers.peer_spec(weights.hf_folder, args.dtype, port),
    }
    binary = peers.llama_server_binary(args.llama_server)
    if binary:
        factories["llama-server"] = lambda port: peers.llama_spec(
            binary, weights.gguf, port, args.users, 2048, args.llama_threads)
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    missing = [s for s in wanted if s not in factories and s != "llama-server"]
    if missing:
        raise SystemExit(f"unknown servers {missing}; known: ours, ours-nocache, peer, llama-server")
    return {name: factories[name] for name in wanted if name in factories}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _rate(value: float | None) -> str:
    return "n/r" if value is None else f"{value:.0%}"


def _tail_median(ttfts: Sequence[float | None]) -> float | None:
    """Median TTFT of turns 8-10 (the last three turns when fewer were run)."""
    tail = sorted(t for t in (ttfts[7:10] if len(ttfts) >= 10 else ttfts[-3:]) if t is not None)
    return tail[len(tail) // 2] if tail else None


def _ratio_row(talks: dict[str, list[Turn]], ours: str, peer: str) -> str:
    """``ours / peer`` TTFT per turn (below 1: ours is faster)."""
    pairs = zip(talks[ours], talks[peer], strict=False)
    cells = [f"{a.ttft_s / b.ttft_s:.2f}" if a.ttft_s and b.ttft_s else "—" for a, b in pairs]
    a, b = _tail_median([t.ttft_s for t in talks[ours]]), _tail_median([t.ttft_s for t in talks[peer]])
    return f"| {ours} / {peer} | " + " | ".join(cells) + f" | {f'{a / b:.2f}' if a and b else '—'} | |"


def render_conversation(results: dict[str, dict[str, Any]]) -> list[str]:
    """The conversation's turn-by-turn TTFT, one row per server, side by side."""
    talks = {n: [Turn(**t) for t in r["conversation"]] for n, r in results.items()}
    turns = max(len(t) for t in talks.values())
    tail = "turns 8-10 median" if turns >= 10 else f"turns {max(1, turns - 2)}-{turns} median"
    lines = ["**Conversation** (TTFT ms per turn; prompt tokens from the first server's usage; "
             "* = sent again after a connection error)", "",
             "| turn | " + " | ".join(str(i + 1) for i in range(turns)) + f" | {tail} | hit rate |",
             "|---" * (turns + 3) + "|"]
    first = next(iter(talks.values()))
    lines.append("| prompt tokens | " + " | ".join(str(t.prompt_tokens or "?") for t in first) + " | | |")
    for name, talk in talks.items():
        cells = [_ms(t.ttft_s) + ("*" if t.retried else "") for t in talk]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_ms(_tail_median([t.ttft_s for t in talk]))} | "
                     f"{_rate(hit_rate(talk))} |")
    if "llama-server" in talks:
        lines += [_ratio_row(talks, name, "llama-server") for name in talks if name.startswith("ours")]
    return lines


def render_shared(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["**Shared system prompt** (16 users start together, 2 turns each; TTFT ms)", "",
             "| server | p50 all | p95 all | p95 first turns | p95 second turns | hit rate | errors |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        users = [[Turn(**t) for t in u] for u in r["shared"]]
        flat = [t for u in users for t in u]
        ok = [t.ttft_s for t in flat if t.ttft_s is not None]
        firsts = [u[0].ttft_s for u in users if u[0].ttft_s is not None]
        seconds = [u[1].ttft_s for u in users if u[1].ttft_s is not None]
        lines.append(f"| {name} | {_ms(percentile(ok, 50))} | {_ms(percentile(ok, 95))} | "
                     f"{_ms(percentile(firsts, 95))} | {_ms(percentile(seconds, 95))} | {_rate(hit_rate(flat))} | "
                     f"{sum(1 for t in flat if t.error)} |")
    return lines


def render(results: dict[str, dict[str, Any]], header: str) -> str:
    lines = [header, "", *render_conversation(results)]
    if any(r["shared"] for r in results.values()):
        lines += ["", *render_shared(results)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--servers", default="ours,ours-nocache,peer,llama-server",
                        help="comma-separated, run in this order (llama-server only with a binary)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--turns", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1),
                        metavar=f"1..{len(QUESTIONS)}", help="turns of the conversation (default all ten)")
    parser.add_argument("--scenarios", default="conversation,shared",
                        help="conversation (always run) and/or shared (the sixteen users)")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help=f"llama-server binary (default ${peers.LLAMA_SERVER_ENV}); unset: not run")
    parser.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    weights = peers.embedded_weights()
    workdir = Path(tempfile.mkdtemp(prefix="bench_multiturn."))
    results: dict[str, dict[str, Any]] = {}
    loads = []
    try:
        for name, make_spec in server_specs(args, weights, workdir).items():
            spec = make_spec(free_port())
            loads.append(f"{name} {os.getloadavg()[0]:.2f}")
            with running(spec, workdir):
                results[name] = asyncio.run(measure(spec, args))
            results[name]["command"] = peers.describe_command(spec)
    except KeyboardInterrupt:
        log.error("interrupted; servers stopped")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not results:
        return 1
    info = report.machine_info()
    header = (f"bench_multiturn.py {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{args.dtype}, {args.max_tokens} new tokens, CPU: {info.get('cpu', '?')}, load average at each "
              f"server's start: {', '.join(loads)}")
    text = render(results, header)
    print("\n" + text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"multiturn_{'-'.join(results)}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    (args.results_dir / f"{stem}.md").write_text(text + "\n")
    (args.results_dir / f"{stem}.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    log.info("saved %s.{md,json} in %s", stem, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
