"""The prompts of answer improvement's passes after the draft (no torch, no model).

Every pass runs under the ``reviser`` system prompt, then the conversation's history, then one
user message that opens with :func:`opening` (the question and the answer under review, as
"Answer A"). Review, revision and the first verdict of a stage therefore begin with the same
tokens, so the engine's prefix cache prefills them once per stage; each pass then adds only its
own instruction. A structured review is held to :func:`review_schema`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_server.conversation_engine.improvement_gate import judge_instruction
from llm_server.conversation_engine.inputs import FALLBACK_REVISER_PROMPT, REVISER_ROLE, SystemPrompt

#: A suggestion is a sentence: it starts with a letter and holds no template or markup characters
#: (a 135M model otherwise fills it with ``{{<ref>https://...`` or a lone ``", "``, to its budget).
SUGGESTION_PATTERN = r"^[A-Za-z][^{}<>\[\]\\|#]*$"
#: A review is bounded by the answer it reviews: an answer under :data:`SHORT_ANSWER_CHARS` gets
#: one suggestion, under :data:`MEDIUM_ANSWER_CHARS` up to two, a longer one up to three; each may
#: be the answer's length divided by that count, within :data:`SUGGESTION_CHARS` (min, max). A
#: one-line answer's review used to cost four times the answer (three 200-character suggestions).
SHORT_ANSWER_CHARS = 160
MEDIUM_ANSWER_CHARS = 480
SUGGESTION_CHARS = (60, 200)
_COUNT_WORDS = {1: "one improvement", 2: "one or two improvements", 3: "one to three improvements"}


def suggestion_limits(answer: str) -> tuple[int, int]:
    """How many suggestions a review of ``answer`` may list, and how long each may be (characters)."""
    size = len(answer.strip())
    count = 1 if size < SHORT_ANSWER_CHARS else 2 if size < MEDIUM_ANSWER_CHARS else 3
    low, high = SUGGESTION_CHARS
    return count, max(low, min(high, size // count))


def review_schema(answer: str) -> dict[str, Any]:
    """The JSON a structured review of ``answer`` is constrained to: numbered suggestions (sentences,
    :func:`suggestion_limits` of them). The review analyses; the revision is its own pass."""
    count, length = suggestion_limits(answer)
    item = {"type": "string", "minLength": 1, "maxLength": length, "pattern": SUGGESTION_PATTERN}
    return {
        "type": "object",
        "properties": {"suggestions": {"type": "array", "items": item, "minItems": 1, "maxItems": count}},
        "required": ["suggestions"],
        "additionalProperties": False,
    }


def _count_words(answer: str) -> str:
    """How many suggestions a review of ``answer`` asks for, in words ("one improvement", ...)."""
    return _COUNT_WORDS[suggestion_limits(answer)[0]]


_JSON_INSTRUCTION = ('\n\nReply with only a JSON object whose "suggestions" field is the list of those '
                     "improvements, each a short sentence about this question.")


def _reviser(system_prompts: SystemPrompt) -> str:
    """The reviser's system prompt (a fallback when the prompts have no ``reviser`` entry)."""
    if isinstance(system_prompts, Mapping):
        return system_prompts.get(REVISER_ROLE) or FALLBACK_REVISER_PROMPT
    return FALLBACK_REVISER_PROMPT


def opening(question: str, answer: str) -> str:
    """How every pass on ``answer`` begins (after the reviser's system prompt and the history): the
    question, then the answer as "Answer A". Review, revision and the first verdict of a stage share
    it, so the engine's prefix cache prefills it once per stage."""
    return f"Question:\n{question.strip()}\n\nAnswer A:\n{answer.strip()}\n\n"


def _reviser_messages(system_prompts: SystemPrompt, history: list[dict[str, str]], prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": _reviser(system_prompts)}, *history, {"role": "user", "content": prompt}]


def review_messages(system_prompts: SystemPrompt, history: list[dict[str, str]], question: str, answer: str,
                    structured: bool) -> list[dict[str, str]]:
    """A review pass: the reviser analyses ``answer`` and lists numbered suggestions (only)."""
    prompt = opening(question, answer) + (
        f"Review answer A. List {_count_words(answer)} (correct errors, add missing facts, make it "
        'clearer), as a numbered list after "Suggestions:". Do not rewrite the answer.'
    )
    if structured:
        prompt += _JSON_INSTRUCTION
    return _reviser_messages(system_prompts, history, prompt)


def revision_messages(system_prompts: SystemPrompt, history: list[dict[str, str]], question: str, answer: str,
                      suggestions: str) -> list[dict[str, str]]:
    """A revision pass: the complete answer to ``question``, ``answer`` improved by ``suggestions``."""
    prompt = opening(question, answer) + (
        f"Suggestions:\n{suggestions.strip()}\n\n"
        "Rewrite answer A, applying the suggestions that are correct. Write only the complete "
        "improved answer to the question, as you would give it to the user: no headings, no notes on the changes."
    )
    return _reviser_messages(system_prompts, history, prompt)


def judge_messages(system_prompts: SystemPrompt, history: list[dict[str, str]], question: str, answer_a: str,
                   answer_b: str) -> list[dict[str, str]]:
    """A verdict pass: which of two answers to ``question`` is better (``answer_a`` first, so the
    verdict on the previous answer and its revision shares the stage's opening)."""
    prompt = opening(question, answer_a) + f"Answer B:\n{answer_b.strip()}\n\n{judge_instruction(system_prompts)}"
    return _reviser_messages(system_prompts, history, prompt)


__all__ = ["SUGGESTION_PATTERN", "judge_messages", "opening", "review_messages", "review_schema",
           "revision_messages", "suggestion_limits"]
