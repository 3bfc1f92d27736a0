"""Overload: N concurrent streams at once on the real server (issue 24: admission by expected wait).

``python benchmarks/overload.py [--streams 200] [--max-tokens 32] [--url URL]`` starts the server
(``python -m llm_server.api.server``: the embedded model, the package's configuration, loopback)
unless ``--url`` names one, opens ``--streams`` streamed ``/v1/chat/completions`` at once, and
reports how many were answered in full, refused (503 with ``Retry-After``), cut by an error, or
hung (no end within ``--timeout-s``), with TTFT and end-to-end percentiles and the server's
queue-time histogram from ``/metrics``. Writes a markdown report to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY = "overload-key-123"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    outcome: str  # answered, refused, error, hung
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    retry_after: str | None = None


async def one_stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, i: int,
                     timeout_s: float) -> Result:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}]}
    started = time.perf_counter()
    ttft: float | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return Result("refused" if resp.status_code == 503 else "error", resp.status_code,
                                  retry_after=resp.headers.get("retry-after"))
                last = ""
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        last = line.removeprefix("data: ")
                        if ttft is None and '"content":"' in last and '"content":""' not in last:
                            ttft = time.perf_counter() - started
                done = last == "[DONE]"
                return Result("answered" if done else "error", 200, ttft, time.perf_counter() - started)
    except TimeoutError:
        return Result("hung", 0, ttft)
    except httpx.HTTPError:
        return Result("error", 0, ttft)


def _percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=100) if len(values) > 1 else [values[0]] * 99
    return f"p50 {q[49]:.2f} s, p95 {q[94]:.2f} s, max {max(values):.2f} s"


def _queue_time(url: str) -> str:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    rows = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("llm_server_request_queue_time_seconds_") and " " in line}
    count, total = rows.get("llm_server_request_queue_time_seconds_count", 0), rows.get(
        "llm_server_request_queue_time_seconds_sum", 0)
    return f"{int(count)} passes, mean {total / count:.2f} s" if count else "-"


def start_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CHAT_SERVER_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "llm_server.api.server", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not get ready")


async def run(url: str, streams: int, max_tokens: int, timeout_s: float) -> list[Result]:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(headers={"X-API-Key": KEY}, timeout=timeout_s, limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        return await asyncio.gather(*(one_stream(client, url, model, max_tokens, i, timeout_s)
                                      for i in range(streams)))


def report(results: list[Result], args: argparse.Namespace, wall_s: float, queue: str) -> str:
    counts = {k: sum(1 for r in results if r.outcome == k) for k in ("answered", "refused", "error", "hung")}
    answered = [r for r in results if r.outcome == "answered"]
    retry = sorted({r.retry_after for r in results if r.retry_after})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return "\n".join([
        f"## Overload: {args.streams} concurrent streams, max_tokens {args.max_tokens} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPUs, shared with other work (timings are noisy).",
        "",
        "| answered | refused (503) | error | hung | wall | TTFT (answered) | end-to-end (answered) | queue time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {counts['answered']} | {counts['refused']} | {counts['error']} | {counts['hung']} | {wall_s:.1f} s | "
        f"{_percentiles([r.ttft_s for r in answered if r.ttft_s is not None])} | "
        f"{_percentiles([r.e2e_s for r in answered if r.e2e_s is not None])} | {queue} |",
        "",
        f"Retry-After values of the refusals: {', '.join(retry) or '-'}.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--url", help="a running server (its key: the KEY of this script)")
    parser.add_argument("--rounds", type=int, default=2, help="bursts on the same server (the first is cold: "
                        "no step measured yet, so admission queues it all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overload.md")
    args = parser.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(Path("/tmp") / "overload_server.log")
    texts, results = [], []
    try:
        for burst in range(1, args.rounds + 1):
            started = time.perf_counter()
            round_results = asyncio.run(run(url, args.streams, args.max_tokens, args.timeout_s))
            text = report(round_results, args, time.perf_counter() - started, _queue_time(url))
            texts.append(f"{text}\n\nBurst {burst} of {args.rounds} on this server "
                         f"({'cold: no step measured before it' if burst == 1 else 'warm'}); queue time is cumulative.")
            print(texts[-1], flush=True)
            results += round_results
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    with args.out.open("a", encoding="utf-8") as out:
        out.write("\n\n".join(texts) + "\n\n")
    print(json.dumps({"hung": sum(r.outcome == "hung" for r in results)}))
    return 0 if all(r.outcome in ("answered", "refused") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
