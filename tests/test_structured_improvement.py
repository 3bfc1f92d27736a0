"""The improvement pipeline's structured reviews: JSON-schema-constrained review passes on the
server's engine and in the spec's Python API (model.generate + an llguidance LogitsProcessor),
parsed into the spec's ``last_result`` keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from llm_server.conversation_engine.improvement import (
    RESULT_KEYS,
    REVIEW_SCHEMA,
    Review,
    improvement_pipeline,
    parse_structured_review,
)
from llm_server.serving.request import Sampling, TurnRequest
from llm_server.serving.service import ChatService
from llm_server.serving.turn_stream import ChatDone
from tests.fakes import ScriptedEngine

PROMPTS = {"assistant": "You answer.", "reviser": "You revise."}
REVIEW = {"suggestions": "Add the river.", "revised_answer": "Paris, on the Seine.", "comments": "Added a fact."}


def test_structured_review_json_is_read_into_the_spec_keys() -> None:
    seen: list[dict[str, Any]] = []

    def generate(messages: list[dict[str, str]], schema: dict[str, Any] | None = None) -> Iterator[str]:
        seen.append({"schema": schema, "last": messages[-1]["content"]})
        yield json.dumps(REVIEW) if schema is not None else "Paris."

    result: dict[str, str] = {}
    reviews: list[Review] = []
    chunks = list(improvement_pipeline(generate, PROMPTS, [], "Capital of France?", result=result,
                                       structured=True, reviews=reviews))
    assert [s["schema"] for s in seen] == [None, REVIEW_SCHEMA, REVIEW_SCHEMA]  # the draft stays free text
    assert "JSON" in seen[1]["last"] and "JSON" not in seen[0]["last"]
    assert tuple(result) == RESULT_KEYS
    assert result["suggestions1"] == "Add the river." and result["revision1"] == "Paris, on the Seine."
    assert result["comments2"] == "Added a fact." and result["reply"] == "Paris, on the Seine." == "".join(chunks)
    assert all(r.revision_found for r in reviews)


def test_structured_intermediate_steps_show_sections_not_json() -> None:
    def generate(messages: list[dict[str, str]], schema: dict[str, Any] | None = None) -> Iterator[str]:
        yield json.dumps(REVIEW) if schema is not None else "Paris."

    text = "".join(improvement_pipeline(generate, PROMPTS, [], "Capital?", intermediate_steps=True, structured=True))
    assert "### Review 1\n\nSuggestions: Add the river.\n\nComments: Added a fact." in text
    assert '"revised_answer"' not in text


@pytest.mark.parametrize("text, revision, found", [
    (json.dumps(REVIEW), "Paris, on the Seine.", True),
    (json.dumps({**REVIEW, "revised_answer": "None"}), "previous", False),
    ('{"suggestions": "cut off', "previous", False),  # cut by max_new_tokens before the revision
    ('{"suggestions": "More.", "revised_answer": "Paris \\"FR\\".", "comm', 'Paris "FR".', True),  # after it
    ("Suggestions: x\nRevised answer: Better.\nComments: y", "Better.", True),
])
def test_parse_structured_review(text: str, revision: str, found: bool) -> None:
    review = parse_structured_review(text, "previous")
    assert review.revision == revision and review.revision_found is found


def test_server_review_passes_are_constrained(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, reply="A fine answer.")
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
    assert [r.request_id for r in engine.requests] == ["imp-draft", "imp-review1", "imp-review2"]
    assert constraints[0] is None and constraints[1] is not None and constraints[2] is not None


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
