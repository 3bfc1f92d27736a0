"""Structured output on the embedded SmolLM2-135M-Instruct, in process (no HTTP):

* ``fallbacks``: the improvement pipeline's parse-fallback rate over a fixed set of prompts,
  text reviews (before) vs JSON-schema-constrained reviews (after). A fallback is a review
  whose revised answer could not be read (the previous answer is kept).
* ``throughput``: decode tok/s of the batching engine with N concurrent requests, all
  constrained to a JSON schema vs none (engine_microbench-style).

    .venv/bin/python benchmarks/structured_bench.py fallbacks --prompts 30
    .venv/bin/python benchmarks/structured_bench.py throughput --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_server.conversation_engine.improvement import Review, improvement_pipeline  # noqa: E402
from llm_server.conversation_engine.inputs import chat_token_ids  # noqa: E402
from llm_server.engine.batch_engine import BatchEngine, EngineConfig  # noqa: E402
from llm_server.engine.constraints import compiler_for  # noqa: E402
from llm_server.engine.types import Finished, GenerationRequest, SamplingParams, TextDelta  # noqa: E402
from llm_server.helper_functionality.yaml_loading import load_system_prompt  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Why is the sky blue?", "How do vaccines work?",
    "What causes the seasons on Earth?", "Explain photosynthesis briefly.", "What is a black hole?",
    "How does a refrigerator keep food cold?", "What is the difference between weather and climate?",
    "Why do cats purr?", "How do airplanes stay in the air?", "What is inflation?",
    "Give three tips for better sleep.", "What is machine learning?", "How do bees make honey?",
    "What is the water cycle?", "Why do we have leap years?", "What is DNA?",
    "How does the internet work?", "Name the planets of the solar system.", "What is gravity?",
    "How do I boil an egg?", "What is the tallest mountain on Earth?", "Why is exercise healthy?",
    "What is a prime number?", "How do volcanoes erupt?", "What is the speed of light?",
    "How do plants grow from seeds?", "What is renewable energy?", "Who wrote Romeo and Juliet?",
    "What are the primary colours?", "How does a compass work?", "What is an atom?",
]
#: Throughput schema: a list too long to finish within max_new_tokens, so constrained and free
#: requests generate the same number of tokens (the free prompt does not end early either).
SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"], "additionalProperties": False}, "minItems": 500}


def load() -> tuple[Any, Any]:
    from llm_server.helper_functionality.model_loading import embedded_gguf_path, initialize

    return initialize(device="cpu", model_id=str(embedded_gguf_path()), dtype="float32", compile=False)


def engine_generate(engine: BatchEngine, tokenizer: Any, params: SamplingParams) -> Any:
    """An improvement ``GenerateFn`` submitting each pass to the batching engine."""

    def generate(messages: list[dict[str, str]], schema: dict[str, Any] | None = None) -> Iterator[str]:
        p = params if schema is None else replace(params, constraint=compiler_for(tokenizer).json_schema(schema))
        stream = engine.submit(GenerationRequest(uuid.uuid4().hex, chat_token_ids(tokenizer, messages), p))
        for event in stream:
            if isinstance(event, TextDelta):
                yield event.text

    return generate


def fallbacks(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer, model = load()
    engine = BatchEngine(tokenizer, model, "m", EngineConfig(max_running=16, max_total_tokens=32768, seed=0))
    engine.start()
    prompts = load_system_prompt()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9,
                            repetition_penalty=1.1, seed=0)
    out: dict[str, Any] = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
    try:
        for structured in (True, False):
            def one(question: str, structured: bool = structured) -> list[Review]:
                reviews: list[Review] = []
                for _ in improvement_pipeline(engine_generate(engine, tokenizer, params), prompts, [], question,
                                              structured=structured, reviews=reviews):
                    pass
                return reviews

            started = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                reviews = [r for rs in pool.map(one, PROMPTS[: args.prompts]) for r in rs]
            failed = sum(not r.revision_found for r in reviews)
            key = "after_structured" if structured else "before_text"
            out[key] = {"reviews": len(reviews), "fallbacks": failed, "rate": round(failed / len(reviews), 3),
                        "seconds": round(time.perf_counter() - started, 1)}
            print(key, out[key], flush=True)
            if args.out:  # partial results survive an interrupted run
                Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        engine.shutdown()
    return out


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer, model = load()
    engine = BatchEngine(tokenizer, model, "m", EngineConfig(max_running=args.concurrency, max_total_tokens=32768))
    engine.start()
    grammar = compiler_for(tokenizer).json_schema(SCHEMA)
    out: dict[str, Any] = {"concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens}
    try:
        for rep in range(args.repeats):
            for label, constraint in (("none", None), ("constrained", grammar)):
                params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, seed=1,
                                        constraint=constraint)
                out.setdefault(label, []).append(run_level(engine, tokenizer, params, args.concurrency))
                print(rep, label, out[label][-1], flush=True)
    finally:
        engine.shutdown()
    for label in ("none", "constrained"):
        out[f"{label}_best_tok_s"] = max(r["tok_s"] for r in out[label])
    out["ratio"] = round(out["constrained_best_tok_s"] / out["none_best_tok_s"], 3)
    out["mask_ms_per_token"] = mask_cost(tokenizer, grammar)
    return out


def mask_cost(tokenizer: Any, grammar: Any, tokens: int = 64) -> float:
    """CPU milliseconds per token of one request's mask + advance, on a document of the schema."""
    text = json.dumps([{"name": f"Person {i}", "age": 20 + i} for i in range(20)])
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    matcher = grammar.matcher()
    started = time.perf_counter()
    for token in ids:
        matcher.allowed(len(tokenizer))
        matcher.advance(token)
    return round((time.perf_counter() - started) * 1000 / len(ids), 3)


def run_level(engine: BatchEngine, tokenizer: Any, params: SamplingParams, n: int) -> dict[str, float]:
    messages = [[{"role": "user", "content": f"List {500 + i} people as a JSON array of objects with name and "
                  "age, then count from 1 to 1000."}] for i in range(n)]
    started = time.perf_counter()
    streams = [engine.submit(GenerationRequest(f"r{i}", chat_token_ids(tokenizer, m), params))
               for i, m in enumerate(messages)]
    tokens = 0
    for stream in streams:
        for event in stream:
            if isinstance(event, Finished):
                tokens += event.completion_tokens
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fallbacks", "throughput"])
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 512 if args.what == "fallbacks" else 64
    result = fallbacks(args) if args.what == "fallbacks" else throughput(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
