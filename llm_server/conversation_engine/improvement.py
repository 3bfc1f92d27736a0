"""Answer improvement: draft -> review 1 -> revision 1 -> review 2 -> revision 2 (no torch here).

The stage logic is sans-IO: :func:`improvement_steps` is a generator that yields the text the
client sees and each :class:`Pass` it needs, and is sent back each pass's full text. Two
drivers run it: :func:`improvement_pipeline` here (synchronous, each pass through a ``generate``
function: full chat messages -> text chunks of one pass), used by the in-process
``ConversationEngine``; and the serving layer's ``TurnStream``, which runs each pass on the
batching engine from the event loop (no thread of its own).

Each stage is the spec's review then revision:

- a **review** pass (``review1`` / ``review2``, the ``reviser`` prompt) analyses the current answer
  and lists numbered suggestions; with ``structured=True`` (the grammar library is installed)
  it is constrained to :data:`REVIEW_SCHEMA`, so even a 135M model's output parses;
- a **revision** pass (``revision1`` / ``revision2``) writes the complete answer again from the
  question, the current answer and the suggestions: free text with the draft's token budget,
  its ``prediction`` the current answer (a revision mostly repeats it);
- the **acceptance gate** (:mod:`~llm_server.conversation_engine.improvement_gate`) keeps the
  current answer unless the revision is better: cheap checks, then (policy ``"judge"``) the
  model's own verdict in two short greedy passes (``judge1a`` / ``judge1b``, both orders,
  constrained to "A"/"B"). ``comments1`` / ``comments2`` say what was decided and why.

``revision1`` / ``revision2`` hold the answer in force after each stage (the revision when
adopted, else the previous answer), so ``revision2 == reply`` and the final answer is never worse
by the gate's measures than the draft.

Streaming: without intermediate steps only the final answer is yielded. With intermediate steps
each stage is preceded by one of :data:`STAGE_HEADINGS` and a blank line, and followed by a
blank line; the draft streams live; a review section ("Suggestions:" then "Comments:", the
gate's decision) is yielded once its revision is decided (a text review streams live, its
"Comments:" line follows), then the revision in force.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_server.conversation_engine.improvement_gate import (
    DEFAULT_GATE,
    GATE_POLICIES,
    JUDGE_MAX_NEW_TOKENS,
    VERDICT_SCHEMA,
    GateDecision,
    candidate_problem,
    decide,
    judge_messages,
    read_verdict,
    same_answer,
)
from llm_server.conversation_engine.improvement_parsing import (
    Review,
    parse_review,
    parse_revision,
    parse_suggestions,
    split_sections,
)
from llm_server.conversation_engine.inputs import (
    DEFAULT_ROLE,
    FALLBACK_REVISER_PROMPT,
    REVISER_ROLE,
    SystemPrompt,
    build_messages,
)

#: Full messages (system first) -> the text chunks of ONE generation pass. A pass's options come
#: as keyword arguments (:func:`pass_options`: ``schema``, ``max_new_tokens``, ``do_sample``,
#: ``prediction``); a function that does not name one (and takes no ``**kwargs``) is not sent it.
#: With ``schema`` the pass must produce JSON valid against that schema.
GenerateFn = Callable[..., Iterator[str]]

#: The JSON a structured review pass is constrained to: one to three numbered suggestions
#: (lengths bound a small model's loops). The review analyses; the revision is its own pass.
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "suggestions": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 200},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["suggestions"],
    "additionalProperties": False,
}
_JSON_INSTRUCTION = (
    '\n\nReply with only a JSON object whose "suggestions" field is a list of one to three improvements '
    "to this answer, each a short sentence about this question."
)

DRAFT_HEADING = "### Draft answer"
REVIEW1_HEADING = "### Review 1"
REVISION1_HEADING = "### Revision 1"
REVIEW2_HEADING = "### Review 2"
FINAL_HEADING = "### Final answer"
#: The headings of the intermediate-steps stream, in order.
STAGE_HEADINGS = (DRAFT_HEADING, REVIEW1_HEADING, REVISION1_HEADING, REVIEW2_HEADING, FINAL_HEADING)
#: Keys of ``last_result`` in improvement mode.
RESULT_KEYS = (
    "draft_answer",
    "suggestions1",
    "revision1",
    "comments1",
    "suggestions2",
    "revision2",
    "comments2",
    "reply",
)


def grammar_available() -> bool:
    """Whether structured reviews can run (the optional grammar library is installed)."""
    return importlib.util.find_spec("llguidance") is not None


# --------------------------------------------------------------------------- review and revision prompts


def _reviser(system_prompts: SystemPrompt) -> str:
    """The reviser's system prompt (a fallback when the prompts have no ``reviser`` entry)."""
    if isinstance(system_prompts, Mapping):
        return system_prompts.get(REVISER_ROLE) or FALLBACK_REVISER_PROMPT
    return FALLBACK_REVISER_PROMPT


def review_messages(system_prompts: SystemPrompt, history: list[dict[str, str]], question: str, answer: str,
                    structured: bool) -> list[dict[str, str]]:
    """A review pass: the reviser analyses ``answer`` and lists numbered suggestions (only)."""
    prompt = (
        f"Question:\n{question.strip()}\n\nAnswer:\n{answer.strip()}\n\n"
        "Review the answer. List up to three concrete improvements (correct errors, add missing facts, "
        'make it clearer), as a numbered list after "Suggestions:". Do not rewrite the answer.'
    )
    if structured:
        prompt += _JSON_INSTRUCTION
    return [{"role": "system", "content": _reviser(system_prompts)}, *history, {"role": "user", "content": prompt}]


def revision_messages(system_prompts: SystemPrompt, history: list[dict[str, str]], question: str, answer: str,
                      suggestions: str) -> list[dict[str, str]]:
    """A revision pass: the complete answer to ``question``, ``answer`` improved by ``suggestions``."""
    prompt = (
        f"Question:\n{question.strip()}\n\nPrevious answer:\n{answer.strip()}\n\n"
        f"Suggestions:\n{suggestions.strip()}\n\n"
        "Rewrite the previous answer, applying the suggestions that are correct. Write only the complete "
        "improved answer to the question, as you would give it to the user: no headings, no notes on the changes."
    )
    return [{"role": "system", "content": _reviser(system_prompts)}, *history, {"role": "user", "content": prompt}]


# --------------------------------------------------------------------------- passes and drivers


@dataclass(frozen=True)
class Pass:
    """One generation pass the pipeline asks its driver for.

    ``messages`` are the pass's full chat messages (system first); ``schema``, when set, holds
    its output to that JSON schema; ``show`` streams its text to the client as it comes;
    ``name`` says which pass it is (``draft``, ``review1``, ``revision1``, ``judge1a``, ...;
    empty for a plain turn). ``max_new_tokens`` (None: the request's budget) caps a short pass;
    ``greedy`` asks for greedy decoding (a verdict is not sampled); ``prediction`` is the text the
    pass will likely repeat (a revision's previous answer), for prompt-lookup speculation.
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None = None
    show: bool = False
    name: str = ""
    max_new_tokens: int | None = None
    greedy: bool = False
    prediction: str | None = None


#: A turn as a sans-IO generator: it yields text for the client and the :class:`Pass` es it
#: needs; its driver runs each pass and ``send`` s back the pass's full text. It returns the
#: turn's result (the spec's ``last_result`` keys).
Steps = Generator[str | Pass, str, dict[str, str]]


@dataclass(frozen=True)
class Advance:
    """What a turn needs next: ``texts`` to show, then ``next_pass`` to run (None: finished)."""

    texts: list[str]
    next_pass: Pass | None
    result: dict[str, str]


def advance(steps: Steps, sent: str | None = None) -> Advance:
    """Run ``steps`` (sending it the text of the pass just run, if any) up to its next pass."""
    texts: list[str] = []
    try:
        step = next(steps) if sent is None else steps.send(sent)
        while isinstance(step, str):
            texts.append(step)
            step = next(steps)
    except StopIteration as stop:
        return Advance(texts, None, stop.value)
    return Advance(texts, step, {})


def run_steps(steps: Steps, generate: GenerateFn) -> Generator[str, None, dict[str, str]]:
    """The synchronous driver: each pass through ``generate``; yields the client's text."""
    step = advance(steps)
    while True:
        yield from step.texts
        if step.next_pass is None:
            return step.result
        text = yield from _run_pass(generate, step.next_pass)
        step = advance(steps, text)


def pass_options(one: Pass) -> dict[str, Any]:
    """The keyword arguments a ``GenerateFn`` gets for ``one`` (only those that are set)."""
    options: dict[str, Any] = {}
    if one.schema is not None:
        options["schema"] = one.schema
    if one.max_new_tokens is not None:
        options["max_new_tokens"] = one.max_new_tokens
    if one.greedy:
        options["do_sample"] = False
    if one.prediction:
        options["prediction"] = one.prediction
    return options


def _accepted(generate: GenerateFn, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` less those ``generate`` does not name (unless it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(generate).parameters
    except (TypeError, ValueError):
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {key: value for key, value in options.items() if key in parameters}


def _run_pass(generate: GenerateFn, one: Pass) -> Generator[str, None, str]:
    """Yield a pass's chunks when it is shown; return its full text."""
    parts: list[str] = []
    for chunk in generate(one.messages, **_accepted(generate, pass_options(one))):
        if chunk:
            parts.append(chunk)
            if one.show:
                yield chunk
    return "".join(parts)


# --------------------------------------------------------------------------- the turn


@dataclass
class _Turn:
    """What every stage of one improvement turn needs."""

    system_prompts: SystemPrompt
    history: list[dict[str, str]]
    message: str
    show: bool
    structured: bool
    gate: str
    draft: str = ""
    decisions: list[GateDecision] = field(default_factory=list)


Votes = tuple[bool | None, ...]


def _judge(turn: _Turn, stage: int, previous: str, candidate: str) -> Generator[str | Pass, str, Votes]:
    """The model's verdict in both orders (the second only when the revision won the first):
    per order, whether it preferred the revision (None: unreadable)."""
    votes: list[bool | None] = []
    for suffix, (a, b), revision_letter in (("a", (previous, candidate), "B"), ("b", (candidate, previous), "A")):
        text = yield Pass(judge_messages(turn.system_prompts, turn.message, a, b),
                          schema=VERDICT_SCHEMA if turn.structured else None, name=f"judge{stage}{suffix}",
                          max_new_tokens=JUDGE_MAX_NEW_TOKENS, greedy=True)
        verdict = read_verdict(text)
        votes.append(None if verdict is None else verdict == revision_letter)
        if not votes[-1]:
            break
    return tuple(votes)


def _improve(turn: _Turn, stage: int, previous: str, heading: str) -> Generator[str | Pass, str, tuple[str, str, str]]:
    """One review -> revision -> gate stage; returns (suggestions, answer in force, comments)."""
    live_review = turn.show and not turn.structured
    if live_review:
        yield f"{heading}\n\n"
    text = yield Pass(review_messages(turn.system_prompts, turn.history, turn.message, previous, turn.structured),
                      schema=REVIEW_SCHEMA if turn.structured else None, show=live_review, name=f"review{stage}")
    suggestions = parse_suggestions(text, turn.structured)
    candidate = parse_revision((yield Pass(
        revision_messages(turn.system_prompts, turn.history, turn.message, previous, suggestions),
        name=f"revision{stage}", prediction=previous)))
    problem = candidate_problem(candidate, previous, turn.draft, suggestions)
    votes: Votes = ()
    if turn.gate == "judge" and problem is None and candidate and not same_answer(candidate, previous):
        votes = yield from _judge(turn, stage, previous, candidate)
    decision = decide(stage, previous, candidate, problem, votes, turn.gate)
    turn.decisions.append(decision)
    if live_review:
        yield f"\n\nComments: {decision.reason}\n\n"
    elif turn.show:
        yield f"{heading}\n\nSuggestions:\n{suggestions}\n\nComments: {decision.reason}\n\n"
    return suggestions, (candidate if decision.adopted else previous), decision.reason


def improvement_steps(
    system_prompts: SystemPrompt,
    history: list[dict[str, str]],
    message: str,
    role: str = DEFAULT_ROLE,
    intermediate_steps: bool = False,
    result: dict[str, str] | None = None,
    structured: bool = False,
    decisions: list[GateDecision] | None = None,
    gate: str = DEFAULT_GATE,
) -> Steps:
    """Draft -> review 1 -> revision 1 -> review 2 -> revision 2, as :data:`Steps`.

    Yields the chunks the client's stream carries and the passes (``draft``, then per stage
    ``reviewN``, ``revisionN`` and, with the judge, ``judgeNa`` / ``judgeNb``); fills ``result``
    (cleared first) with draft_answer, suggestions1, revision1, comments1, suggestions2,
    revision2, comments2 and reply (== revision2), stage by stage, and returns it. The draft is
    the first pass, with messages ``build_messages(system_prompts, message, role, history)``.
    ``structured`` constrains reviews and verdicts to their schemas; ``gate`` is one of
    :data:`GATE_POLICIES`; ``decisions`` (when given) receives each stage's :class:`GateDecision`.
    """
    if gate not in GATE_POLICIES:
        raise ValueError(f"unknown gate {gate!r}; known: {', '.join(GATE_POLICIES)}")
    result = result if result is not None else {}
    result.clear()
    turn = _Turn(system_prompts, list(history), message, intermediate_steps, structured, gate)
    draft_pass = Pass(build_messages(system_prompts, message, role, history), show=turn.show, name="draft")
    if turn.show:
        yield f"{DRAFT_HEADING}\n\n"
    turn.draft = (yield draft_pass).strip()
    if turn.show:
        yield "\n\n"
    result["draft_answer"] = turn.draft
    suggestions, answer, comments = yield from _improve(turn, 1, turn.draft, REVIEW1_HEADING)
    result.update(suggestions1=suggestions, revision1=answer, comments1=comments)
    if turn.show:
        yield f"{REVISION1_HEADING}\n\n{answer}\n\n"
    suggestions, answer, comments = yield from _improve(turn, 2, answer, REVIEW2_HEADING)
    result.update(suggestions2=suggestions, revision2=answer, comments2=comments, reply=answer)
    if decisions is not None:
        decisions.extend(turn.decisions)
    yield f"{FINAL_HEADING}\n\n{answer}\n\n" if turn.show else answer
    return result


def improvement_pipeline(
    generate: GenerateFn,
    system_prompts: SystemPrompt,
    history: list[dict[str, str]],
    message: str,
    role: str = DEFAULT_ROLE,
    intermediate_steps: bool = False,
    result: dict[str, str] | None = None,
    structured: bool = False,
    decisions: list[GateDecision] | None = None,
    gate: str = DEFAULT_GATE,
) -> Iterator[str]:
    """:func:`improvement_steps` driven synchronously, each pass through ``generate``.

    Yields the chunks the client's stream carries and fills ``result`` as
    :func:`improvement_steps` does (the Python API's ``last_result``).
    """
    steps = improvement_steps(system_prompts, history, message, role, intermediate_steps, result, structured,
                              decisions, gate)
    yield from run_steps(steps, generate)


__all__ = [
    "GATE_POLICIES", "RESULT_KEYS", "REVIEW_SCHEMA", "STAGE_HEADINGS", "Advance", "GateDecision", "GenerateFn",
    "Pass", "Review", "Steps", "advance", "grammar_available", "improvement_pipeline", "improvement_steps",
    "parse_review", "pass_options", "review_messages", "revision_messages", "run_steps", "split_sections",
]
