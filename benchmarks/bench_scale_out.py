#!/usr/bin/env python3
"""Scale-out benchmark: aggregate output tokens/s of 1 replica vs 2 replicas on Ray Serve, same cores.

Both applications run at once on one local Ray instance, on the embedded model (model_config.yaml),
and are measured *interleaved* (one level on one, the same level on the other, then the next
round), so a CPU shared with other work disturbs both alike:

- ``one``: 1 replica, ``num_cpus=2`` (2 OpenMP threads; ``--one-cpus 1``: 1 thread), under ``/one``;
- ``two``: 2 replicas, ``num_cpus=1`` each (1 OpenMP thread each), under ``/two``.

Only one application is driven at a time (Ray's CPU accounting is told 4 CPUs so both can be
placed; the machine's cores are shared, never used by both at once). The load is the serving
benchmark's: streaming chat completions through the ``openai`` client, greedy, ``--max-tokens``
each, closed loop (``concurrency`` workers). Run from the repository root::

    .venv/bin/python benchmarks/bench_scale_out.py --levels 16,32 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servebench.client import run_level  # noqa: E402


def deploy(port: int, one_cpus: float) -> None:
    """Start Ray and Serve, deploy ``one`` and ``two``; returns when both are ready."""
    import ray
    from ray import serve

    from llm_server.api.settings import load_settings
    from llm_server.scale_out.config import ScaleOutConfig
    from llm_server.scale_out.deployment import build_application

    settings = load_settings().with_overrides(open_access=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, replicas, cpus in (("one", 1, one_cpus), ("two", 2, 1.0)):
        options = ScaleOutConfig(replicas=replicas, num_cpus=cpus, app_name=name, route_prefix=f"/{name}")
        serve.run(build_application(settings, options), name=name, route_prefix=f"/{name}")


async def measure(port: int, levels: list[int], rounds: int, requests: int, max_tokens: int) -> list[str]:
    from openai import AsyncOpenAI

    clients = {name: AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/{name}/v1", api_key="none", max_retries=0,
                                 timeout=600) for name in ("one", "two")}
    model = (await clients["one"].models.list()).data[0].id
    await run_level(clients["one"], model, 2, 2, 8)  # warm-up of both
    await run_level(clients["two"], model, 4, 4, 8)
    rows = []
    for round_no in range(1, rounds + 1):
        for level in levels:
            for name in ("one", "two") if round_no % 2 else ("two", "one"):
                result = await run_level(clients[name], model, level, max(requests, level), max_tokens)
                row = (f"| {round_no} | {level} | {name} | {result.requests} | {result.errors} | "
                       f"{result.completion_tokens} | {result.wall_s:.1f} | {result.tokens_per_s:.1f} |")
                print(row, flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="16,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--one-cpus", type=float, default=2.0, help="num_cpus (= OpenMP threads) of the 1-replica app")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    deploy(args.port, args.one_cpus)
    print("| round | concurrent | app | requests | errors | tokens | wall s | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        asyncio.run(measure(args.port, [int(x) for x in args.levels.split(",")], args.rounds, args.requests,
                            args.max_tokens))
    finally:
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
