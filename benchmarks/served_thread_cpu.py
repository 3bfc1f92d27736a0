#!/usr/bin/env python3
"""Where a served one-user token's CPU goes: tok/s of one streamed user, and CPU per token of each
server thread and of the client.

Starts ``start_llm_server`` on the embedded model with the benchmark's config (the package's YAML,
bf16, as ``bench_serving.py`` writes it; ``--set KEY=VALUE`` changes ``model``), streams greedy
64-token chat completions one after another with the official ``openai`` client for ``--seconds``
after 16 warm-up requests, and reads each server thread's CPU time from ``/proc`` before and after.
On 2 cores the engine thread and its OpenMP worker share the cores with the event loop and the
client, so their CPU per token shows who waits for whom (docs/benchmarks.md). Run two variants
alternately (an environment variable, or ``PYTHONPATH`` at another checkout run from another
directory): the machine's speed moves by 10-20 % within minutes.

    .venv/bin/python benchmarks/served_thread_cpu.py --seconds 20
    LLM_SERVER_WEIGHT_ARENA=0 .venv/bin/python benchmarks/served_thread_cpu.py --seconds 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import PROMPTS, SYSTEM_MESSAGE  # noqa: E402

from servebench import peers  # noqa: E402
from servebench.servers import free_port  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds (user + system) of each thread of ``pid``, by (thread id, name)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        found[tid, name] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def stream_one(client: object, index: int) -> int:
    """One greedy 64-token streamed chat completion; its content chunks."""
    chunks = 0
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model=MODEL_NAME, max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": SYSTEM_MESSAGE},
                  {"role": "user", "content": PROMPTS[index % len(PROMPTS)]}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
    return chunks


def wait_ready(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model_config override")
    args = parser.parse_args()
    import openai

    model_dir = str(peers.embedded_weights().hf_folder)
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config"
        peers.write_our_config(config, model_dir, "bfloat16", port, 32, 64, args.set)
        spec = peers.ours_spec(config, port)
        with open(Path(work) / "server.log", "w") as log:
            server = subprocess.Popen(spec.command, env=spec.env, stdout=subprocess.DEVNULL, stderr=log, cwd=work)
        try:
            wait_ready(spec.ready_url)
            client = openai.OpenAI(base_url=spec.base_url, api_key=spec.api_key)
            for index in range(16):
                stream_one(client, index)
            before, client_before, started = thread_cpu(server.pid), os.times(), time.perf_counter()
            tokens = requests = 0
            while time.perf_counter() - started < args.seconds:
                tokens += stream_one(client, requests)
                requests += 1
            wall = time.perf_counter() - started
            after, client_after = thread_cpu(server.pid), os.times()
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"{tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} tok/s ({requests} requests)")
    for key, seconds in after.items():
        used = seconds - before.get(key, 0.0)
        if used > 0.05:
            print(f"  server thread {key[1]:16s} {used / wall:6.1%} of a core, {used / tokens * 1e3:.2f} ms/token")
    used = client_after.user + client_after.system - client_before.user - client_before.system
    print(f"  client                        {used / wall:6.1%} of a core, {used / tokens * 1e3:.2f} ms/token")


if __name__ == "__main__":
    main()
