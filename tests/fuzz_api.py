"""Schemathesis against the server's own OpenAPI document: ``python -m tests.fuzz_api [--real] [-n N]``.

Serves the app on a real uvicorn on loopback (the scripted engine of :mod:`tests.fakes`, or with
``--real`` the embedded model, as ``make fuzz`` does), then runs the ``schemathesis`` command line
(``--checks all``, every phase, a fixed seed, with the key) against ``/openapi.json`` and exits
with its status: 0 means no failure. Then it sends the fixed corpus of bad inputs of
``make probe`` (:mod:`tests.probe_cases`), where any 5xx is a failure. ``tests/test_openapi.py``
runs it with few examples in ``make test``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

API_KEY = "fuzz-key-123"
#: Per-operation settings (with the reason for each).
CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 12
PHASES = "examples,coverage,fuzzing,stateful"
#: Checks left off, and why (every other check of ``--checks all`` runs):
#: none. The response-time check (ST112) gets a generous bound, RESPONSE_TIME_LIMIT_S: a
#: generation on the real model takes seconds on a busy CPU, and timing is a benchmark's
#: business, not a correctness check (it still catches a request that hangs).
EXCLUDED_CHECKS: dict[str, str] = {}
RESPONSE_TIME_LIMIT_S = 300


def _settings(real: bool) -> Any:
    from llm_server.api.settings import ServerSettings, load_settings

    if real:
        # The real model and configuration, with answers capped at 64 tokens so that a few
        # hundred generated requests finish in minutes on a CPU (the cap is in the document too).
        return load_settings().with_overrides(api_keys=(API_KEY,), open_access=False, max_new_tokens_limit=64)
    return ServerSettings(api_keys=(API_KEY,), max_new_tokens_limit=64,
                          system_prompts={"assistant": "You are the test assistant.", "pirate": "Arr."})


def _fake_engine() -> Any:
    from llm_server.helper_functionality.model_loading import load_tokenizer
    from tests.conftest import embedded_gguf
    from tests.fakes import ScriptedEngine

    tokenizer = load_tokenizer(str(embedded_gguf()))
    return ScriptedEngine(tokenizer, reply="a short scripted answer for the fuzzer", max_context=100_000)


@contextmanager
def served(real: bool) -> Iterator[str]:
    from llm_server.api.server import create_app
    from tests.spec_harness import serving

    settings = _settings(real)
    app = create_app(None if real else _fake_engine, settings=settings)
    with serving(app, timeout_s=600) as url:
        yield url


def run_schemathesis(url: str, examples: int, *, capture: bool = True,
                     max_time_s: int | None = None) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
        "--checks", "all", *(["--exclude-checks", ",".join(EXCLUDED_CHECKS)] if EXCLUDED_CHECKS else []),
        "--phases", PHASES, "--seed", str(SEED), "--max-examples", str(examples),
        "--header", f"X-API-Key: {API_KEY}",
        "--request-timeout", "120", "--no-color", "--workers", "1", "--generation-database", "none",
        "--max-response-time", str(RESPONSE_TIME_LIMIT_S),
    ]
    if max_time_s is not None:
        command += ["--max-time", str(max_time_s)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    return subprocess.run(command, capture_output=capture, text=True, env=env, timeout=7200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--real", action="store_true", help="the embedded model (default: the scripted engine)")
    parser.add_argument("-n", "--examples", type=int, default=20)
    parser.add_argument("--max-time", type=int, help="time budget of the whole run in seconds")
    args = parser.parse_args(argv)
    with served(args.real) as url:  # schemathesis reports as it goes, on this terminal
        status = run_schemathesis(url, args.examples, capture=False, max_time_s=args.max_time).returncode
        return status or run_corpus(url)


def run_corpus(url: str) -> int:
    """The fixed corpus of bad inputs (``make probe``'s cases, issue 24): 1 if any gets a 5xx."""
    import httpx

    from tests.probe_cases import CASES

    bad = []
    with httpx.Client(timeout=120) as client:
        for case in CASES:
            headers = {"X-API-Key": API_KEY, "Content-Type": "application/json", **case.headers}
            try:
                status: int | str = client.request(case.method, f"{url}{case.path}", content=case.body,
                                                   headers=headers).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if not isinstance(status, int) or status >= 500:
                bad.append(f"{case.name}: {status}")
    print(f"fixed corpus: {len(CASES)} bad inputs, {len(bad)} x 5xx or no answer", *bad, sep="\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
