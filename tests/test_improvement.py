"""Answer improvement: reviewer-output parsing and the draft/review/revision/gate pipeline (no model)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from llm_server.conversation_engine.improvement import (
    RESULT_KEYS,
    STAGE_HEADINGS,
    Pass,
    advance,
    improvement_pipeline,
    improvement_steps,
    parse_review,
    review_schema,
)
from llm_server.conversation_engine.inputs import build_messages

PROMPTS = {"assistant": "ASSISTANT PROMPT", "reviser": "REVISER PROMPT", "poet": "POET PROMPT"}

WELL_FORMED = """Suggestions:
1. Mention gradient descent.
2. Give an example.

Revised answer:
Networks learn by gradient descent.
They adjust weights to reduce a loss.

Comments:
Added the mechanism."""


class ScriptedGenerate:
    """A GenerateFn replaying fixed pass outputs (in small chunks) and recording the messages."""

    def __init__(self, *outputs: str) -> None:
        self.outputs = list(outputs)
        self.calls: list[list[dict[str, str]]] = []

    def __call__(self, messages: list[dict[str, str]]) -> Iterator[str]:
        self.calls.append(messages)
        text = self.outputs[len(self.calls) - 1]
        for start in range(0, len(text), 7):
            yield text[start : start + 7]


def run(generate: ScriptedGenerate, steps: bool, result: dict[str, str] | None = None, **kwargs) -> str:
    return "".join(improvement_pipeline(generate, PROMPTS, [], "How do nets learn?", intermediate_steps=steps,
                                        result=result, **kwargs))  # fmt: skip


# --------------------------------------------------------------------------- parsing


def test_parses_a_well_formed_review() -> None:
    review = parse_review(WELL_FORMED, "old draft")
    assert review.suggestions == "1. Mention gradient descent.\n2. Give an example."
    assert review.revision == "Networks learn by gradient descent.\nThey adjust weights to reduce a loss."
    assert review.comments == "Added the mechanism."
    assert review.revision_found


@pytest.mark.parametrize(
    "text",
    [
        "**Suggestions:**\n1. a\n\n**Revised answer:**\nBetter text.\n\n**Comments:**\nok",
        "## Suggestions\n1. a\n\n## Revised Answer\nBetter text.\n\n## Comments\nok",
        "SUGGESTIONS: 1. a\nREVISED ANSWER: Better text.\nCOMMENTS: ok",
        "Suggestions:\n1. a\nComments:\nok\nRevised answer:\nBetter text.",
        "Improvements:\n- a\nImproved answer:\n\"Better text.\"\nNotes: ok",
        "Feedback: a\n\nImproved version:\n[improved version]\nBetter text.\n\nChanges made:\nok",
    ],
)
def test_parses_format_variants(text: str) -> None:
    review = parse_review(text, "old draft")
    assert review.revision == "Better text."
    assert review.comments == "ok"
    assert "a" in review.suggestions


@pytest.mark.parametrize(
    "text",
    [
        "Suggestions:\n1. a\nComments:\nnothing",  # no revision section
        "Suggestions:\n1. a\nRevised answer:\n\nComments:\nx",  # empty revision
        "Suggestions:\n1. a\nRevised answer: None\nComments:\nx",
        "Suggestions:\n1. a\nRevised answer:\n**None.**\n",
        "Revised answer:\nN/A",
        "Revised answer:\n<the complete improved answer>",
    ],
)
def test_missing_empty_or_none_revision_falls_back_to_previous_answer(text: str) -> None:
    review = parse_review(text, "the previous answer")
    assert review.revision == "the previous answer"
    assert not review.revision_found


def test_unformatted_output_becomes_suggestions_and_keeps_the_answer() -> None:
    review = parse_review("I think this is fine but could be longer.", "draft")
    assert review.suggestions == "I think this is fine but could be longer."
    assert (review.revision, review.comments) == ("draft", "")


def test_words_inside_sentences_are_not_headers() -> None:
    text = "Suggestions:\n1. Revision is needed in part two.\nRevised answer:\nComments are welcome here. Fine."
    review = parse_review(text, "draft")
    assert review.suggestions == "1. Revision is needed in part two."
    assert review.revision == "Comments are welcome here. Fine."


# --------------------------------------------------------------------------- pipeline


DRAFT = "Draft text about learning."
REVIEW1 = "Suggestions:\n1. Mention gradient descent."
REVISION1 = "Networks learn by gradient descent. They adjust weights to reduce a loss."
REVIEW2 = "Suggestions:\n1. Mention backprop."
REVISION2 = "Networks learn by backprop and gradient descent, adjusting weights to reduce a loss."
#: Each revision wins the judgement in both orders (revision shown second: "B", then first: "A").
ADOPTING = (DRAFT, REVIEW1, REVISION1, "B", "A", REVIEW2, REVISION2, "B", "A")


def test_pipeline_fills_every_result_key_and_streams_only_the_final_answer() -> None:
    generate = ScriptedGenerate(*ADOPTING)
    result = {"stale": "from an earlier turn"}
    streamed = run(generate, steps=False, result=result)
    assert tuple(result) == RESULT_KEYS
    assert result["draft_answer"] == DRAFT
    assert result["revision1"] == REVISION1 and result["comments1"].startswith("Adopted the revision")
    assert result["revision2"] == result["reply"] == REVISION2
    assert result["suggestions1"] == "1. Mention gradient descent."
    assert result["suggestions2"] == "1. Mention backprop."
    assert streamed == REVISION2
    assert not any(heading in streamed for heading in STAGE_HEADINGS)


def test_pipeline_messages_use_role_history_and_previous_answers() -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    generate = ScriptedGenerate(*ADOPTING)
    list(improvement_pipeline(generate, PROMPTS, history, "Q?", role="poet"))
    draft, review1, revision1, judge_a, judge_b, review2, revision2, *_ = generate.calls
    assert draft == [{"role": "system", "content": "POET PROMPT"}, *history, {"role": "user", "content": "Q?"}]
    for call in (review1, revision1, review2, revision2):
        assert call[0] == {"role": "system", "content": "REVISER PROMPT"} and call[1:3] == history
    assert "Q?" in review1[-1]["content"] and DRAFT in review1[-1]["content"]
    assert DRAFT in revision1[-1]["content"] and "1. Mention gradient descent." in revision1[-1]["content"]
    assert REVISION1 in judge_a[-1]["content"] and DRAFT in judge_b[-1]["content"]
    assert REVISION1 in review2[-1]["content"]  # review 2 reviews the adopted revision 1
    assert REVISION1 in revision2[-1]["content"] and "1. Mention backprop." in revision2[-1]["content"]


def test_intermediate_steps_stream_each_stage_under_its_heading() -> None:
    result: dict[str, str] = {}
    streamed = run(ScriptedGenerate(*ADOPTING), steps=True, result=result)
    positions = [streamed.index(heading + "\n\n") for heading in STAGE_HEADINGS]
    assert positions == sorted(positions) and positions[0] == 0
    assert streamed.count("### ") == len(STAGE_HEADINGS)
    assert f"### Draft answer\n\n{DRAFT}\n\n### Review 1\n\n{REVIEW1}\n\nComments: {result['comments1']}" in streamed
    assert f"### Revision 1\n\n{REVISION1}\n\n### Review 2\n\n{REVIEW2}" in streamed
    assert streamed.endswith(f"### Final answer\n\n{REVISION2}\n\n")


def test_a_model_ignoring_the_format_still_gets_a_real_final_answer() -> None:
    result: dict[str, str] = {}
    draft = "  The draft is a full sentence.  "
    streamed = run(ScriptedGenerate(draft, "Revised answer: None", "blah", "blah", "None"), steps=False,
                   result=result)
    assert result["revision1"] == result["revision2"] == result["reply"] == "The draft is a full sentence."
    assert streamed == "The draft is a full sentence."
    assert result["suggestions2"] == "blah"
    assert "fragment" in result["comments1"] and "empty" in result["comments2"]


def test_the_steps_ask_for_each_pass_explicitly_and_return_the_result() -> None:
    """The sans-IO pipeline: the first thing it needs is the draft pass (built by build_messages),
    then per stage a review, a revision and (for a plausible revision) the judgement; the driver
    sends each pass's text back and gets the result at the end."""
    result: dict[str, str] = {}
    steps = improvement_steps(PROMPTS, [], "How do nets learn?", result=result, structured=True)
    opening = advance(steps)
    assert opening.texts == []
    assert opening.next_pass == Pass(build_messages(PROMPTS, "How do nets learn?"), name="draft")
    review1 = advance(steps, " A short draft answer. ")
    assert result["draft_answer"] == "A short draft answer."
    assert review1.next_pass is not None and review1.next_pass.name == "review1"
    assert review1.next_pass.schema == review_schema("A short draft answer.")
    assert "A short draft answer." in review1.next_pass.messages[-1]["content"]
    revision1 = advance(steps, '{"suggestions": ["Say how."]}')
    assert revision1.next_pass is not None and revision1.next_pass.name == "revision1"
    assert revision1.next_pass.prediction == "A short draft answer." and revision1.next_pass.schema is None
    judge = advance(steps, "A better, longer answer.")
    assert judge.next_pass is not None and judge.next_pass.name == "judge1a"
    second = advance(steps, '{"better": "B"}')
    assert second.next_pass is not None and second.next_pass.name == "judge1b"
    review2 = advance(steps, '{"better": "A"}')
    assert review2.next_pass is not None and review2.next_pass.name == "review2"
    revision2 = advance(steps, '{"suggestions": ["Add more."]}')
    assert revision2.next_pass is not None and revision2.next_pass.name == "revision2"
    end = advance(steps, "6.5")
    assert end.next_pass is None and end.texts == ["A better, longer answer."]
    assert end.result is result and result["revision1"] == "A better, longer answer." == result["reply"]
    assert "bare number" in result["comments2"]


def test_unknown_role_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown role 'pirate'"):
        list(improvement_pipeline(ScriptedGenerate("x"), PROMPTS, [], "Q", role="pirate"))


def test_build_messages_accepts_a_single_string_prompt() -> None:
    assert build_messages("Be brief.", "Q", conversation_history=[]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
    ]


def test_improvement_module_does_not_import_torch() -> None:
    code = (
        "import sys, llm_server.conversation_engine.improvement as m, llm_server.conversation_engine.inputs\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
