"""Soak test: the real server under a steady mixed load, minute by minute (``make soak``).

Starts ``start_llm_server`` (the embedded model, real uvicorn on loopback, a key of its own)
unless ``--url`` names a running server, then keeps ``--concurrency`` clients (default 32) busy
for ``--duration-s`` (default 600) with a mix of:

- ``/chat/blocking`` and ``/chat/stream`` (the spec's API), one in eight with ``improvement``;
- ``/v1/chat/completions`` whole and streamed (SSE);
- clients that leave: a stream closed after its first chunk, a blocking request given up
  after 0.3 s (these are expected to end early and are not errors).

Every minute it records requests finished (by kind), errors by kind (HTTP status, in-band
stream error, transport error) and the server's RSS; at the end it prints a markdown table
(also written to ``--out``). The target: 0 unexpected errors, RSS flat after the first minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

KEY = "soak-key-123"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Explain what an API is in two sentences.", "Name three fruits.", "Write a haiku about rain.",
           "What is the capital of France?", "Give one tip for writing clear code."]


@dataclass
class Minute:
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    rss_mib: float = 0.0


class Soak:
    """The clients, the per-minute tallies and the RSS probe."""

    def __init__(self, url: str, pid: int | None, max_tokens: int) -> None:
        self.url = url
        self.pid = pid
        self.max_tokens = max_tokens
        self.minutes: list[Minute] = [Minute()]
        self.headers = {"X-API-Key": KEY}

    # --- bookkeeping ----------------------------------------------------------------------------
    def ok(self, kind: str) -> None:
        self.minutes[-1].done[kind] += 1

    def error(self, kind: str, what: str) -> None:
        self.minutes[-1].done[kind] += 1
        self.minutes[-1].errors[f"{kind}: {what}"] += 1

    def rss_mib(self) -> float:
        if self.pid is None:
            return float("nan")
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    # --- the requests -----------------------------------------------------------------------------
    def _spec_body(self, improvement: bool = False) -> dict[str, object]:
        return {"prompt": random.choice(PROMPTS), "history": [], "improvement": improvement,
                "intermediate_steps": False, "max_new_tokens": self.max_tokens}

    def _v1_body(self, stream: bool) -> dict[str, object]:
        return {"model": self.model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": self.max_tokens, "stream": stream}

    async def blocking(self, client: httpx.AsyncClient, improvement: bool = False) -> None:
        kind = "improvement" if improvement else "chat/blocking"
        r = await client.post(f"{self.url}/chat/blocking", json=self._spec_body(improvement), headers=self.headers)
        self.ok(kind) if r.status_code == 200 and "reply" in r.json() else self.error(kind, str(r.status_code))

    async def spec_stream(self, client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{self.url}/chat/stream", json=self._spec_body(),
                                 headers=self.headers) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
        if r.status_code != 200:
            self.error("chat/stream", str(r.status_code))
        elif not text.endswith("[[END]]"):
            self.error("chat/stream", "in-band error" if "[[ERROR]]" in text else "truncated")
        else:
            self.ok("chat/stream")

    async def v1(self, client: httpx.AsyncClient) -> None:
        r = await client.post(f"{self.url}/v1/chat/completions", json=self._v1_body(False), headers=self.headers)
        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        self.ok("v1") if ok else self.error("v1", str(r.status_code))

    async def v1_stream(self, client: httpx.AsyncClient) -> None:
        events: list[str] = []
        async with client.stream("POST", f"{self.url}/v1/chat/completions", json=self._v1_body(True),
                                 headers=self.headers) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
        if r.status_code != 200:
            self.error("v1 stream", str(r.status_code))
        elif not events or events[-1] != "[DONE]":
            self.error("v1 stream", "in-band error" if any('"error"' in e for e in events) else "truncated")
        else:
            self.ok("v1 stream")

    async def leave_stream(self, client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{self.url}/chat/stream", json=self._spec_body(),
                                 headers=self.headers) as r:
            if r.status_code != 200:
                self.error("leaves", str(r.status_code))
                return
            async for _ in r.aiter_text():
                break  # the client goes away after the first chunk
        self.ok("leaves")

    async def leave_blocking(self, client: httpx.AsyncClient) -> None:
        try:
            r = await client.post(f"{self.url}/chat/blocking", json=self._spec_body(), headers=self.headers,
                                  timeout=httpx.Timeout(30, read=0.3))
        except httpx.ReadTimeout:
            self.ok("leaves")  # expected: the client gave up
            return
        self.ok("leaves") if r.status_code == 200 else self.error("leaves", str(r.status_code))

    # --- driving ----------------------------------------------------------------------------------
    def _pick(self) -> tuple[str, Callable[[httpx.AsyncClient], Awaitable[None]]]:
        mix: list[tuple[str, Callable[[httpx.AsyncClient], Awaitable[None]]]] = [
            ("chat/blocking", self.blocking), ("chat/blocking", self.blocking), ("chat/stream", self.spec_stream),
            ("chat/stream", self.spec_stream), ("v1", self.v1), ("v1 stream", self.v1_stream),
            ("v1 stream", self.v1_stream), ("leaves", self.leave_stream), ("leaves", self.leave_blocking),
            ("improvement", lambda c: self.blocking(c, improvement=True)),
        ]
        return random.choice(mix)

    async def client_loop(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30)) as client:
            while time.monotonic() < deadline:
                kind, work = self._pick()
                try:
                    await work(client)
                except httpx.HTTPError as exc:  # e.g. no answer within the client's 300 s
                    self.error(kind, type(exc).__name__)

    async def run(self, concurrency: int, duration_s: float) -> None:
        async with httpx.AsyncClient() as client:
            self.model = (await client.get(f"{self.url}/v1/models", headers=self.headers)).json()["data"][0]["id"]
        start = time.monotonic()
        deadline = start + duration_s
        clients = [asyncio.create_task(self.client_loop(deadline)) for _ in range(concurrency)]
        next_tick = start + 60
        while not all(c.done() for c in clients):
            await asyncio.sleep(0.5)
            if time.monotonic() >= next_tick:
                self.minutes[-1].rss_mib = self.rss_mib()
                self.minutes.append(Minute())
                next_tick += 60
        await asyncio.gather(*clients)
        self.minutes[-1].rss_mib = self.rss_mib()
        if not sum(self.minutes[-1].done.values()):
            self.minutes.pop()


KINDS = ("chat/blocking", "chat/stream", "v1", "v1 stream", "improvement", "leaves")


def table(minutes: list[Minute]) -> str:
    head = "| minute | requests | " + " | ".join(KINDS) + " | errors | RSS MiB |"
    rows = [head, "|" + "---:|" * (len(KINDS) + 4)]
    for i, m in enumerate(minutes, 1):
        errors = ", ".join(f"{k} x{n}" for k, n in sorted(m.errors.items())) or "0"
        rows.append(f"| {i} | {sum(m.done.values())} | " + " | ".join(str(m.done[k]) for k in KINDS)
                    + f" | {errors} | {m.rss_mib:.0f} |")
    total_errors = sum(sum(m.errors.values()) for m in minutes)
    rows.append(f"\nTotal: {sum(sum(m.done.values()) for m in minutes)} requests, {total_errors} unexpected errors.")
    return "\n".join(rows)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "CHAT_SERVER_API_KEY": KEY}
    command = [str(Path(sys.executable).with_name("start_llm_server")), "--host", "127.0.0.1", "--port", str(port)]
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
    raise SystemExit("the server did not get ready in 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--url", help="a running server (its key must be soak-key-123); default: start one")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.md")
    args = parser.parse_args()
    random.seed(12)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(ROOT / "benchmarks" / "results" / "soak_server.log")
    try:
        soak = Soak(url, proc.pid if proc else None, args.max_tokens)
        asyncio.run(soak.run(args.concurrency, args.duration_s))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    report = (f"Soak: {args.concurrency} concurrent for {args.duration_s:.0f} s, max_tokens {args.max_tokens}, "
              f"server {url}\n\n{table(soak.minutes)}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(json.dumps({"errors": sum(sum(m.errors.values()) for m in soak.minutes)}))


if __name__ == "__main__":
    main()
