"""Answer improvement on the real embedded SmolLM2-135M-Instruct: whatever the small model's
reviews and revisions say, the final answer is never degenerate next to its draft (issue 20)."""

from __future__ import annotations

from typing import Any

import pytest

from llm_server.conversation_engine.improvement import RESULT_KEYS, grammar_available, improvement_pipeline
from llm_server.conversation_engine.improvement_gate import REAL_ANSWER_CHARS, GateDecision, is_bare_number, is_fragment
from llm_server.conversation_engine.outputs import make_generate_fn
from llm_server.helper_functionality.yaml_loading import load_system_prompt

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Explain how REST APIs work.",
    "Give me three tips for writing a good cover letter.",
    "What is 7 times 8?",
]


def degenerate(final: str, draft: str) -> bool:
    """Empty, a fragment or a bare number where the draft was not, or under a third of a real draft."""
    return (not final.strip() or (is_fragment(final) and not is_fragment(draft))
            or (is_bare_number(final) and not is_bare_number(draft))
            or (len(draft) >= REAL_ANSWER_CHARS and 3 * len(final) < len(draft)))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_no_degenerate_final_on_the_embedded_model(embedded: tuple[Any, Any], prompt: str) -> None:
    tokenizer, model = embedded
    generate = make_generate_fn(tokenizer, model, max_new_tokens=32, do_sample=False, repetition_penalty=1.1)
    result: dict[str, str] = {}
    decisions: list[GateDecision] = []
    streamed = "".join(improvement_pipeline(generate, load_system_prompt(), [], prompt, intermediate_steps=True,
                                            result=result, structured=grammar_available(), decisions=decisions))
    assert tuple(result) == RESULT_KEYS and result["reply"] == result["revision2"]
    assert result["draft_answer"] and not degenerate(result["reply"], result["draft_answer"])
    assert len(decisions) == 2
    for decision, comments in zip(decisions, (result["comments1"], result["comments2"]), strict=True):
        assert comments == decision.reason and comments.startswith(("Adopted", "Kept"))
        assert f"Comments: {comments}" in streamed
    assert streamed.endswith(f"### Final answer\n\n{result['reply']}\n\n")



def test_a_pass_stops_at_its_stop_string_even_when_prompt_lookup_accepts_past_it(embedded: tuple[Any, Any]) -> None:
    """The Python API's ``stop``: prompt-lookup decoding appends several tokens a step, so the stop
    string can land inside one step's tokens (transformers' ``stop_strings`` look only at the end
    and miss it); the pass still ends there."""
    tokenizer, model = embedded
    generate = make_generate_fn(tokenizer, model, max_new_tokens=40, do_sample=False, repetition_penalty=1.0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    messages = [{"role": "user", "content": f"Repeat these words exactly: {words}"}]
    full = "".join(generate(messages, prediction=words))
    assert "epsilon zeta eta theta" in full  # the model repeats them
    stopped = "".join(generate(messages, stop=(" epsilon",), prediction=words))
    assert " epsilon" in stopped and full.startswith(stopped) and "theta" not in stopped
