"""Grammar-constrained decoding and logprobs inside the batching engine (tiny random Llama).

A random model emits garbage on its own, so every constrained output that parses is the
grammar's doing; free requests sharing the same steps must be unaffected.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.constraints import GrammarError, compiler_for
from llm_server.engine.types import Finished, GenerationRequest, LogprobLog, SamplingParams, TextDelta
from tests.test_engine_batching import PROMPTS, build_model, encode

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "colour", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


@pytest.fixture(scope="module")
def engine(tokenizer: Any, model: Any) -> Any:
    engine = BatchEngine(tokenizer, model, "tiny", EngineConfig(max_running=8, max_total_tokens=8192, seed=0))
    engine.start()
    yield engine
    engine.shutdown()


def run(engine: BatchEngine, requests: list[GenerationRequest]) -> list[tuple[str, Finished]]:
    """Submit all at once (one batch) and collect each text and its Finished."""
    streams = [engine.submit(r) for r in requests]
    results: list[tuple[str, Finished]] = []
    for stream in streams:
        parts: list[str] = []
        for event in stream:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                results.append(("".join(parts), event))
    return results


def test_constrained_greedy_and_sampled_outputs_follow_the_schema(engine: BatchEngine, tokenizer: Any) -> None:
    grammar = compiler_for(tokenizer).json_schema(SCHEMA)
    requests = [
        GenerationRequest(f"c{i}", encode(tokenizer, p), SamplingParams(
            max_new_tokens=40, temperature=0.0 if i % 2 else 1.0, seed=i, constraint=grammar))
        for i, p in enumerate(PROMPTS)
    ]
    for text, done in run(engine, requests):
        assert done.reason == "stop", text  # EOS came right after the document closed
        value = json.loads(text)
        assert set(value) == {"answer", "colour", "count"}
        assert isinstance(value["answer"], bool) and value["colour"] in {"red", "green", "blue"}
        assert 0 <= value["count"] <= 9


def test_free_requests_in_a_mixed_batch_match_their_solo_greedy_output(engine: BatchEngine, tokenizer: Any) -> None:
    grammar = compiler_for(tokenizer).json_object()
    free = SamplingParams(max_new_tokens=12, do_sample=False)
    alone = [run(engine, [GenerationRequest(f"solo{i}", encode(tokenizer, p), free)])[0][0]
             for i, p in enumerate(PROMPTS[:3])]
    mixed: list[GenerationRequest] = []
    for i, prompt in enumerate(PROMPTS[:3]):
        mixed.append(GenerationRequest(f"free{i}", encode(tokenizer, prompt), free))
        mixed.append(GenerationRequest(f"json{i}", encode(tokenizer, prompt),
                                       SamplingParams(max_new_tokens=12, do_sample=False, constraint=grammar)))
    results = run(engine, mixed)
    assert [text for text, _ in results[0::2]] == alone
    for text, _ in results[1::2]:
        assert text.startswith("{")  # the constrained neighbours really were constrained
    assert alone[0] and not alone[0].startswith("{")


def test_eos_is_allowed_only_where_the_grammar_accepts(tokenizer: Any) -> None:
    matcher = compiler_for(tokenizer).json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                                  "required": ["a"]}).matcher()
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    assert not matcher.allowed(vocab)[eos]
    for token in tokenizer.encode('{"a": 7', add_special_tokens=False):
        assert matcher.allowed(vocab)[token]
        matcher.advance(token)
    assert not matcher.allowed(vocab)[eos]  # the object is still open
    for token in tokenizer.encode("}", add_special_tokens=False):
        matcher.advance(token)
    allowed = matcher.allowed(vocab)
    assert allowed[eos] and int(allowed.sum()) == 1  # complete: only the end is left


@pytest.mark.parametrize("schema, problem", [
    ({"type": "foo"}, "foo"),
    ({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ([1, 2], "object"),
])
def test_uncompilable_schemas_raise_a_grammar_error_naming_the_problem(
        tokenizer: Any, schema: Any, problem: str) -> None:
    with pytest.raises(GrammarError, match=problem):
        compiler_for(tokenizer).json_schema(schema)


def test_logprobs_are_recorded_per_token_with_alternatives(engine: BatchEngine, tokenizer: Any) -> None:
    log = LogprobLog()
    params = SamplingParams(max_new_tokens=6, do_sample=False, logprobs=3, logprob_sink=log)
    text, done = run(engine, [GenerationRequest("lp", encode(tokenizer, PROMPTS[0]), params)])[0]
    items = log.drain()
    assert len(items) == done.completion_tokens
    for item in items:
        assert len(item.top) == 3 and item.logprob <= 0.0
        assert item.top[0][0] == item.token_id  # greedy: the chosen id is the likeliest
        assert math.isclose(item.top[0][1], item.logprob, rel_tol=1e-5)
        assert [lp for _, lp in item.top] == sorted((lp for _, lp in item.top), reverse=True)
    assert tokenizer.decode([i.token_id for i in items]).startswith(text[:3])
    assert log.drain() == []


def test_matchers_are_created_in_the_submitting_thread(engine: BatchEngine, tokenizer: Any) -> None:
    """Compiling a grammar never happens on the scheduler thread: ``submit`` builds the matcher."""
    grammar = compiler_for(tokenizer).json_object()
    seen: list[str] = []
    original = type(grammar).matcher

    def spy(self: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(self)

    type(grammar).matcher = spy  # type: ignore[method-assign]
    try:
        run(engine, [GenerationRequest("t", encode(tokenizer, "Hi"),
                                       SamplingParams(max_new_tokens=4, constraint=grammar))])
    finally:
        type(grammar).matcher = original  # type: ignore[method-assign]
    assert seen == [threading.current_thread().name]
