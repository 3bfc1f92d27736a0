"""The improvement pipeline's structured reviews: JSON-schema-constrained review passes on the
server's engine and in the spec's Python API (model.generate + an llguidance LogitsProcessor),
parsed into the spec's ``last_result`` keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from llm_server.conversation_engine.improvement import (
    RESULT_KEYS,
    improvement_pipeline,
    review_schema,
)
from llm_server.conversation_engine.improvement_gate import VERDICT_SCHEMA, GateDecision
from llm_server.serving.request import Sampling, TurnRequest
from llm_server.serving.service import ChatService
from llm_server.serving.turn_stream import ChatDone
from tests.fakes import ScriptedEngine

PROMPTS = {"assistant": "You answer.", "reviser": "You revise."}
REVIEW = {"suggestions": ["Add the river."]}
REVISED = "Paris is the capital of France, on the Seine."


def scripted(messages: list[dict[str, str]], schema: dict[str, Any] | None = None, **options: Any) -> Iterator[str]:
    """Draft "The capital is Paris.", a JSON review, a revision adding the river, a judge preferring it."""
    if schema == VERDICT_SCHEMA:
        answer_b = messages[-1]["content"].split("Answer B:")[1]
        yield json.dumps({"better": "B" if answer_b.lstrip().startswith(REVISED) else "A"})
    elif schema is not None:
        yield json.dumps(REVIEW)
    elif "Rewrite answer A" in messages[-1]["content"]:
        yield REVISED
    else:
        yield "The capital is Paris."


def test_structured_review_json_is_read_into_the_spec_keys() -> None:
    seen: list[dict[str, Any]] = []

    def generate(messages: list[dict[str, str]], schema: dict[str, Any] | None = None, **options: Any) -> Iterator[str]:
        seen.append({"schema": schema, "last": messages[-1]["content"]})
        yield from scripted(messages, schema, **options)

    result: dict[str, str] = {}
    decisions: list[GateDecision] = []
    chunks = list(improvement_pipeline(generate, PROMPTS, [], "Capital of France?", result=result,
                                       structured=True, decisions=decisions))
    # draft, review 1, revision 1, judge (both orders), review 2, revision 2 (repeats: no judge)
    assert [s["schema"] for s in seen] == [None, review_schema("The capital is Paris."), None, VERDICT_SCHEMA,
                                          VERDICT_SCHEMA, review_schema(REVISED), None]
    assert "JSON" in seen[1]["last"] and "JSON" not in seen[0]["last"] and "JSON" not in seen[2]["last"]
    assert tuple(result) == RESULT_KEYS
    assert result["suggestions1"] == "1. Add the river." and result["revision1"] == REVISED
    assert result["comments1"].startswith("Adopted") and "repeats" in result["comments2"]
    assert result["reply"] == REVISED == "".join(chunks)
    assert [d.adopted for d in decisions] == [True, False]


def test_structured_intermediate_steps_show_sections_not_json() -> None:
    text = "".join(improvement_pipeline(scripted, PROMPTS, [], "Capital?", intermediate_steps=True, structured=True))
    assert "### Review 1\n\nSuggestions:\n1. Add the river.\n\nComments: Adopted the revision" in text
    assert '"suggestions"' not in text and '"better"' not in text


def test_server_review_passes_are_constrained(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, reply="A fine answer about the capital of France, Paris.")
    engine.start()
    service = ChatService(engine, PROMPTS, max_new_tokens_limit=100)
    options = TurnRequest(messages=({"role": "user", "content": "Capital of France?"},), improvement=True,
                          sampling=Sampling(max_new_tokens=50), request_id="imp")
    stream = service.open(options)

    async def drain() -> ChatDone:
        async for event in stream:
            if isinstance(event, ChatDone):
                return event
        raise AssertionError("no ChatDone")

    import asyncio

    done = asyncio.run(drain())
    assert tuple(done.result) == RESULT_KEYS
    constraints = [r.params.constraint for r in engine.requests]
    # the scripted engine always says the same: the revision is rejected by the checks, no judgement runs
    assert [r.request_id for r in engine.requests] == ["imp-draft", "imp-review1", "imp-review2", "imp-revision1",
                                                       "imp-revision2"]
    assert [c is not None for c in constraints] == [False, True, True, False, False]
    assert done.result["comments1"].startswith("Kept the previous answer")
    assert done.result["reply"] == done.result["draft_answer"]


def test_python_api_generate_honours_a_schema(tokenizer: Any, tiny_model: Any) -> None:
    """The spec API's pass function (model.generate) constrained by the LogitsProcessor."""
    from llm_server.conversation_engine.outputs import make_generate_fn

    generate = make_generate_fn(tokenizer, tiny_model, max_new_tokens=40, do_sample=True, temperature=1.0)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    for _ in range(3):
        text = "".join(generate([{"role": "user", "content": "Reply in JSON."}], schema=schema))
        value = json.loads(text)
        assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


def test_python_api_generate_honours_pass_options(tokenizer: Any, tiny_model: Any) -> None:
    """The Python API honours a pass's max_new_tokens, do_sample and stop strings, and prompt-lookup
    decoding for a pass with a prediction leaves greedy output unchanged."""
    from llm_server.conversation_engine.outputs import make_generate_fn

    generate = make_generate_fn(tokenizer, tiny_model, max_new_tokens=40, do_sample=False)
    messages = [{"role": "user", "content": "Repeat: the quick brown fox jumps over the lazy dog."}]
    full = "".join(generate(messages))
    short = "".join(generate(messages, max_new_tokens=3))
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 4 < len(full)
    assert "".join(generate(messages, prediction="the quick brown fox jumps over the lazy dog")) == full
    stop = full[:6]  # (this random model writes newlines)
    stopped = "".join(generate(messages, stop=(stop,)))  # the text keeps the stop string
    assert full.startswith(stopped) and len(stop) - 2 <= len(stopped) <= len(stop) + 2 < len(full)
    looked_up = "".join(generate(messages, stop=(stop,), prediction=full))  # several tokens a step: still stopped
    assert full.startswith(looked_up) and stop in looked_up and len(looked_up) < len(full)
    sampled = make_generate_fn(tokenizer, tiny_model, max_new_tokens=12, do_sample=True, temperature=1.5)
    assert "".join(sampled(messages, do_sample=False, max_new_tokens=12)) == "".join(generate(messages,
                                                                                              max_new_tokens=12))
