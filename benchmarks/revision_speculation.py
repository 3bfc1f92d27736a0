"""Does speculation from a prediction pay for a revision? Decode time per token with and without it.

Sends the revision pass of the quality benchmark's open prompts (their draft and review 1 from a
saved ``improvement_quality_*.json`` run) to a running server's ``/v1/chat/completions``, streamed,
once with the draft as OpenAI's ``prediction`` and once without, interleaved per prompt. Prints, per
setting, the completion tokens, the decode time per token (first content chunk to the end, so the
prefill is left out) and the accepted / rejected prediction tokens.

    .venv/bin/python -m llm_server.api.server --port 8231 --open-access &
    .venv/bin/python benchmarks/revision_speculation.py \
        --run benchmarks/results/improvement_quality_20261207-180300_http_defaults.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_server.conversation_engine.improvement_parsing import REVISION_STOPS  # noqa: E402
from llm_server.conversation_engine.improvement_prompts import revision_messages  # noqa: E402
from llm_server.helper_functionality.yaml_loading import load_system_prompt  # noqa: E402


def one(url: str, model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int,
        prediction: str | None) -> tuple[int, float, int, int]:
    """(completion tokens, decode seconds, accepted, rejected prediction tokens) of one streamed request."""
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                            "stop": list(REVISION_STOPS)[:4],  # the API takes at most 4 stop strings
                            "stream": True, "stream_options": {"include_usage": True}}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    first = None
    usage: dict[str, Any] = {}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    details = usage.get("completion_tokens_details") or {}
    return (usage["completion_tokens"], time.perf_counter() - (first or time.perf_counter()),
            details.get("accepted_prediction_tokens", 0), details.get("rejected_prediction_tokens", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a saved improvement_quality_*.json")
    parser.add_argument("--url", default="http://127.0.0.1:8231")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    rows = [r for r in json.loads(args.run.read_text())["rows"]["http"] if r["kind"] == "open"][: args.prompts]
    totals = {True: [0, 0.0, 0, 0], False: [0, 0.0, 0, 0]}
    for row in rows:
        result = row["result"]
        messages = revision_messages(load_system_prompt(), [], row["prompt"], result["draft_answer"],
                                     result["suggestions1"])
        for with_prediction in (True, False):
            outcome = one(args.url, args.model, messages, args.temperature, args.max_tokens,
                          result["draft_answer"] if with_prediction else None)
            totals[with_prediction] = [a + b for a, b in zip(totals[with_prediction], outcome, strict=True)]
    for with_prediction, (tokens, seconds, accepted, rejected) in totals.items():
        print(f"temperature {args.temperature}, prediction {'on ' if with_prediction else 'off'}: {tokens} tokens, "
              f"{seconds / tokens * 1e3:.2f} ms a token (decode); accepted {accepted}, rejected {rejected}")


if __name__ == "__main__":
    main()
