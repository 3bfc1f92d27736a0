"""Answer improvement: draft -> review 1 -> revision 1 -> review 2 -> revision 2 (no torch here).

The stage logic is sans-IO (:mod:`~llm_server.conversation_engine.passes`):
:func:`improvement_steps` yields the text the client sees and each :class:`Pass` it needs.
:func:`improvement_pipeline` drives it synchronously for the in-process ``ConversationEngine``;
the serving layer's ``TurnStream`` runs its passes on the batching engine.

Each stage is the spec's review then revision:

- every pass after the draft runs under the ``reviser`` prompt and opens with the question and the
  answer under review (:func:`opening`), so the engine's prefix cache prefills that once per stage;
- a **review** pass (``review1`` / ``review2``, the ``reviser`` prompt) analyses the current answer
  and lists numbered suggestions; with ``structured=True`` (the grammar library is installed)
  it is constrained to :func:`review_schema` (bounded by the answer it reviews), so even a 135M
  model's output parses;
- a **revision** pass (``revision1`` / ``revision2``) writes the complete answer again from the
  question, the current answer and the suggestions: free text with the draft's token budget,
  its ``prediction`` the current answer (a revision mostly repeats it), no repetition penalty
  (the penalty counts prompt tokens, so it would push the revision away from the answer it
  rewrites), :data:`REVISION_STOPS` (the labels of its prompt, which a small model echoes), and a
  ``RunawayWatch`` that stops it the moment it loops or recites its instructions;
- the **acceptance gate** (:mod:`~llm_server.conversation_engine.improvement_gate`) keeps the
  current answer unless the revision is better: cheap checks, then (policy ``"judge"``) the
  model's own verdict in two short greedy passes (``judge1a`` / ``judge1b``, both orders,
  constrained to "A"/"B"). ``comments1`` / ``comments2`` say what was decided and why.

``revision1`` / ``revision2`` hold the answer in force after each stage (the revision when
adopted, else the previous answer), so ``revision2 == reply`` and the final answer is never worse
by the gate's measures than the draft. Cost (:func:`_stages`): under greedy decoding stage 2 runs
only when stage 1 changed the answer (else it would repeat stage 1 word for word); sampled, on the
engine, stage 2 starts on the draft batched with stage 1, and reruns only if stage 1 adopts.

Streaming: without intermediate steps only the final answer is yielded. With intermediate steps
each stage is preceded by one of :data:`STAGE_HEADINGS` and a blank line, and followed by a
blank line; the draft streams live; a review section ("Suggestions:" then "Comments:", the
gate's decision) is yielded once its revision is decided (a text review streams live, its
"Comments:" line follows), then the revision in force.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace

from llm_server.conversation_engine.improvement_gate import (
    DEFAULT_GATE,
    GATE_POLICIES,
    JUDGE_MAX_NEW_TOKENS,
    VERDICT_SCHEMA,
    GateDecision,
    RunawayWatch,
    candidate_problem,
    decide,
    read_verdict,
    runaway_problem,
    same_answer,
)
from llm_server.conversation_engine.improvement_parsing import (
    REVISION_STOPS,
    Review,
    parse_review,
    parse_revision,
    parse_suggestions,
    split_sections,
)
from llm_server.conversation_engine.improvement_prompts import (
    judge_messages,
    opening,
    review_messages,
    review_schema,
    revision_messages,
)
from llm_server.conversation_engine.inputs import (
    DEFAULT_ROLE,
    SystemPrompt,
    build_messages,
)
from llm_server.conversation_engine.passes import (
    Advance,
    GenerateFn,
    Pass,
    Sent,
    Step,
    Steps,
    advance,
    ask,
    pass_options,
    run_steps,
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


# --------------------------------------------------------------------------- one stage


@dataclass
class _Turn:
    """What every stage of one improvement turn needs."""

    system_prompts: SystemPrompt
    history: list[dict[str, str]]
    message: str
    show: bool
    structured: bool
    gate: str
    greedy: bool = False
    together: bool = False
    draft: str = ""
    decisions: list[GateDecision] = field(default_factory=list)
    result: dict[str, str] = field(default_factory=dict)

    @property
    def live_review(self) -> bool:
        """A text review streams live under its heading (a structured one is shown once parsed)."""
        return self.show and not self.structured


@dataclass(frozen=True)
class _Stage:
    """What one review -> revision -> gate stage produced."""

    suggestions: str
    decision: GateDecision

    @property
    def answer(self) -> str:
        """The answer in force after the stage: the revision if adopted, else the previous answer."""
        return self.decision.candidate if self.decision.adopted else self.decision.previous


Votes = tuple[bool | None, ...]
#: A stage's passes (one at a time); it is sent each pass's text and returns what it decided.
StagePasses = Generator[Pass, Sent, _Stage]


def _judge(turn: _Turn, stage: int, previous: str, candidate: str) -> Generator[Pass, Sent, Votes]:
    """The model's verdict in both orders (the second only when the revision won the first):
    per order, whether it preferred the revision (None: unreadable)."""
    votes: list[bool | None] = []
    for suffix, (a, b), revision_letter in (("a", (previous, candidate), "B"), ("b", (candidate, previous), "A")):
        text = yield from ask(Pass(judge_messages(turn.system_prompts, turn.history, turn.message, a, b),
                                   schema=VERDICT_SCHEMA if turn.structured else None, name=f"judge{stage}{suffix}",
                                   max_new_tokens=JUDGE_MAX_NEW_TOKENS, greedy=True))
        verdict = read_verdict(text)
        votes.append(None if verdict is None else verdict == revision_letter)
        if not votes[-1]:
            break
    return tuple(votes)


def _stage(turn: _Turn, stage: int, previous: str, live: bool) -> StagePasses:
    """One stage's passes: review (streamed when ``live``), revision, then the gate's judgement."""
    text = yield from ask(Pass(review_messages(turn.system_prompts, turn.history, turn.message, previous,
                                               turn.structured),
                               schema=review_schema(previous) if turn.structured else None, show=live,
                               name=f"review{stage}"))
    suggestions = parse_suggestions(text, turn.structured)
    messages = revision_messages(turn.system_prompts, turn.history, turn.message, previous, suggestions)
    instructions = messages[0]["content"]  # the reviser's system prompt
    watch = RunawayWatch(previous, instructions) if turn.gate != "none" else None
    raw = yield from ask(Pass(messages, name=f"revision{stage}", prediction=previous, stop=REVISION_STOPS,
                              repetition_penalty=1.0, stop_when=watch))
    candidate = parse_revision(raw)
    problem = (runaway_problem(raw, previous, instructions)
               or candidate_problem(candidate, previous, turn.draft, suggestions))
    votes: Votes = ()
    if turn.gate == "judge" and problem is None and candidate and not same_answer(candidate, previous):
        votes = yield from _judge(turn, stage, previous, candidate)
    return _Stage(suggestions, decide(stage, previous, candidate, problem, votes, turn.gate))


def _report(turn: _Turn, heading: str, outcome: _Stage, live: bool) -> Iterator[str]:
    """Record a stage's decision and result keys; with intermediate steps, its section (after a live
    review: its comments)."""
    turn.decisions.append(outcome.decision)
    stage = outcome.decision.stage
    turn.result.update({f"suggestions{stage}": outcome.suggestions, f"revision{stage}": outcome.answer,
                        f"comments{stage}": outcome.decision.reason})
    if live:
        yield f"\n\nComments: {outcome.decision.reason}\n\n"
    elif turn.show:
        yield f"{heading}\n\nSuggestions:\n{outcome.suggestions}\n\nComments: {outcome.decision.reason}\n\n"


def _improve(turn: _Turn, stage: int, previous: str, heading: str) -> Generator[Step, Sent, _Stage]:
    """One stage, run on its own and reported."""
    if turn.live_review:
        yield f"{heading}\n\n"
    outcome = yield from _stage(turn, stage, previous, turn.live_review)
    yield from _report(turn, heading, outcome, turn.live_review)
    return outcome


# --------------------------------------------------------------------------- two stages


def _together(*stages: StagePasses) -> Generator[tuple[Pass, ...], Sent, list[_Stage]]:
    """Independent stages in lockstep: each step yields the next pass of every stage still running,
    as one tuple (the engine batches them); returns each stage's outcome, in order."""
    running: dict[int, Pass] = {}
    done: dict[int, _Stage] = {}

    def resume(i: int, sent: str | None) -> None:
        try:
            running[i] = next(stages[i]) if sent is None else stages[i].send(sent)
        except StopIteration as stop:
            done[i] = stop.value

    for i in range(len(stages)):
        resume(i, None)
    while running:
        order = sorted(running)
        texts = yield tuple(running.pop(i) for i in order)
        for i, text in zip(order, texts if isinstance(texts, tuple) else (texts,), strict=True):
            resume(i, text)
    return [done[i] for i in range(len(stages))]


def _repeated(first: _Stage) -> _Stage:
    """Stage 2 under greedy decoding when stage 1 kept the draft: its prompts are stage 1's, so
    its passes would repeat stage 1's word for word; stage 1's outcome stands, not run again."""
    reason = (f"{first.decision.reason} Review 2 was not run: with greedy decoding it would repeat review 1 "
              "and its revision word for word.")
    return _Stage(first.suggestions, replace(first.decision, stage=2, reason=reason))


def _stages(turn: _Turn) -> Generator[Step, Sent, tuple[_Stage, _Stage]]:
    """Both stages, in the cheapest way that gives what running them one after the other gives.

    Greedy: stage 2 only when stage 1 adopted its revision (else it would repeat stage 1).
    Sampled, with a driver that runs passes together: stage 2 starts at once on the draft,
    batched with stage 1 (stage 1 usually keeps the draft); it is run again on the revision when
    stage 1 adopts it. Otherwise: one stage after the other.
    """
    guess: _Stage | None
    if turn.together and not turn.greedy:
        if turn.live_review:
            yield f"{REVIEW1_HEADING}\n\n"
        first, guess = yield from _together(_stage(turn, 1, turn.draft, turn.live_review),
                                            _stage(turn, 2, turn.draft, False))
        yield from _report(turn, REVIEW1_HEADING, first, turn.live_review)
    else:
        first = yield from _improve(turn, 1, turn.draft, REVIEW1_HEADING)
        guess = _repeated(first) if turn.greedy else None
    if turn.show:
        yield f"{REVISION1_HEADING}\n\n{first.answer}\n\n"
    if guess is None or first.decision.adopted:
        return first, (yield from _improve(turn, 2, first.answer, REVIEW2_HEADING))
    yield from _report(turn, REVIEW2_HEADING, guess, False)
    return first, guess


# --------------------------------------------------------------------------- the turn


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
    *,
    greedy: bool = False,
    together: bool = False,
) -> Steps:
    """Draft -> review 1 -> revision 1 -> review 2 -> revision 2, as :data:`Steps`.

    Yields the chunks the client's stream carries and the passes (``draft``, then per stage
    ``reviewN``, ``revisionN`` and, with the judge, ``judgeNa`` / ``judgeNb``); fills ``result``
    (cleared first) with draft_answer, suggestions1, revision1, comments1, suggestions2,
    revision2, comments2 and reply (== revision2), stage by stage, and returns it. The draft is
    the first pass, with messages ``build_messages(system_prompts, message, role, history)``.
    ``structured`` constrains reviews and verdicts to their schemas; ``gate`` is one of
    :data:`GATE_POLICIES`; ``decisions`` (when given) receives each stage's :class:`GateDecision`.
    ``greedy``: the driver decodes the passes greedily (a repeated prompt repeats its output);
    ``together``: the driver runs a tuple of passes at once (see :func:`_stages`).
    """
    if gate not in GATE_POLICIES:
        raise ValueError(f"unknown gate {gate!r}; known: {', '.join(GATE_POLICIES)}")
    result = result if result is not None else {}
    result.clear()
    turn = _Turn(system_prompts, list(history), message, intermediate_steps, structured, gate, greedy, together,
                 result=result)
    if turn.show:
        yield f"{DRAFT_HEADING}\n\n"
    turn.draft = (yield from ask(Pass(build_messages(system_prompts, message, role, history), show=turn.show,
                                      name="draft"))).strip()
    if turn.show:
        yield "\n\n"
    result["draft_answer"] = turn.draft
    _, second = yield from _stages(turn)
    result["reply"] = second.answer
    if decisions is not None:
        decisions.extend(turn.decisions)
    yield f"{FINAL_HEADING}\n\n{second.answer}\n\n" if turn.show else second.answer
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
    *,
    greedy: bool = False,
) -> Iterator[str]:
    """:func:`improvement_steps` driven synchronously, each pass through ``generate``.

    Yields the chunks the client's stream carries and fills ``result`` as
    :func:`improvement_steps` does (the Python API's ``last_result``). ``greedy``: ``generate``
    decodes greedily (stage 2 is then run only when stage 1 changed the answer).
    """
    steps = improvement_steps(system_prompts, history, message, role, intermediate_steps, result, structured,
                              decisions, gate, greedy=greedy)
    yield from run_steps(steps, generate)


__all__ = [
    "GATE_POLICIES", "RESULT_KEYS", "STAGE_HEADINGS", "Advance", "GateDecision", "GenerateFn",
    "Pass", "Review", "Steps", "advance", "grammar_available", "improvement_pipeline", "improvement_steps",
    "judge_messages", "opening", "parse_review", "pass_options", "review_messages", "review_schema",
    "revision_messages", "run_steps", "split_sections",
]
