"""The acceptance gate of answer improvement: keep the previous answer unless a revision is better.

Sans-IO like the pipeline (no torch, no model): :func:`runaway_problem` rejects a revision that loops
or recites its instructions (checks that only turn true as text is added, so :class:`RunawayWatch`
stops such a revision the moment they do); :func:`candidate_problem` holds the cheap checks
that reject a revision outright (empty, a template echo, a bare number, a fragment or an answer
under a third of a real draft's length, a copy of the suggestions, talk about the review instead
of an answer); :func:`judge_instruction` / :func:`read_verdict` ask and read the model's own
pairwise judgement ("A" or "B", constrained by :data:`VERDICT_SCHEMA`), asked in both orders so
the model's position bias cannot adopt a revision alone. :class:`GateDecision` records what was
decided and why; its ``reason`` is what ``comments1`` / ``comments2`` show.

Policies (:data:`GATE_POLICIES`): ``"judge"`` (default) adopts a revision that passes the checks
and wins the judgement in both orders; ``"checks"`` adopts any revision that passes the checks;
``"none"`` adopts every non-empty revision (the old behaviour, kept to measure the gate against).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

GATE_POLICIES = ("judge", "checks", "none")
DEFAULT_GATE = "judge"

#: A draft at least this long (characters) is a "real" answer: a revision under a third of it is a fragment.
REAL_ANSWER_CHARS = 80
#: Fewer words than this is a fragment (unless the previous answer was as short).
MIN_ANSWER_WORDS = 3
#: A revision this similar (difflib ratio) to the suggestions is a copy of them.
COPY_RATIO = 0.6

#: The pairwise verdict a judge pass is constrained to.
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"better": {"type": "string", "enum": ["A", "B"]}},
    "required": ["better"],
    "additionalProperties": False,
}
#: New tokens a judge pass needs at most (the verdict object is about six tokens).
JUDGE_MAX_NEW_TOKENS = 16
#: How the judge is told to judge when the system prompts have no ``judge`` entry.
FALLBACK_JUDGE_PROMPT = (
    "Judge strictly: compare the two answers to the same question and pick the one that is more correct, "
    "complete and clear."
)
JUDGE_ROLE = "judge"

_BARE_NUMBER = re.compile(r"^[\s$€£]*[-+]?\d[\d,.\s]*%?\s*[.!]?\s*$")
_TEMPLATE = re.compile(
    r"\{\{|\}\}|\{%|%\}|json_object|<[^<>\n]{0,40}answer[^<>\n]{0,40}>|\[improved[^\]]*\]", re.IGNORECASE
)
_META = re.compile(
    r"\b(draft answer|the draft|suggestions?|suggested (improvements?|changes?)|revised answer|original answer"
    r"|improved (answer|version)|the reviewer?)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class GateDecision:
    """One revision's fate: ``adopted`` or not, with the ``reason`` shown to the user.

    ``problem`` is the failed check (None: the checks passed); ``votes`` holds, per judgement order,
    whether the model preferred the revision (None: that order was not asked or not readable).
    """

    stage: int
    previous: str
    candidate: str
    adopted: bool
    reason: str
    problem: str | None = None
    votes: tuple[bool | None, ...] = ()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_bare_number(text: str) -> bool:
    """Only a number (with a unit sign at most): not an answer written for a person."""
    return bool(_BARE_NUMBER.match(text))


def is_fragment(text: str) -> bool:
    """Fewer than :data:`MIN_ANSWER_WORDS` words, or no letters at all."""
    return len(_words(text)) < MIN_ANSWER_WORDS or not re.search(r"[A-Za-z]", text)


def copies(text: str, source: str) -> bool:
    """``text`` is mostly ``source`` (the suggestions) repeated."""
    if not source.strip():
        return False
    a, b = " ".join(_words(text)), " ".join(_words(source))
    return bool(a) and difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= COPY_RATIO


def candidate_problem(candidate: str, previous: str, draft: str, suggestions: str) -> str | None:
    """Why ``candidate`` cannot replace ``previous`` (None: it passes every check)."""
    if not candidate.strip():
        return "is empty"
    if _TEMPLATE.search(candidate) and not _TEMPLATE.search(previous):
        return "echoes a template placeholder"
    if is_bare_number(candidate) and not is_bare_number(previous):
        return "is a bare number"
    if is_fragment(candidate) and not is_fragment(previous):
        return "is a fragment"
    if len(draft) >= REAL_ANSWER_CHARS and len(candidate) * 3 < len(draft):
        return f"is under a third of the draft's length ({len(candidate)} of {len(draft)} characters)"
    if copies(candidate, suggestions):
        return "copies the suggestions instead of answering"
    if len(_META.findall(candidate)) > len(_META.findall(previous)):
        return "talks about the review instead of answering the question"
    return None


# --------------------------------------------------------------------------- runaway revisions

#: A revision that says a passage of LOOP_CHARS (min, max) characters twice in a row loops: sampled, a
#: 135M model does, to the end of its budget ("... of the last part of the last part of the last part").
LOOP_CHARS = (24, 300)
#: A revision that says this many characters of its instructions (the reviser's system prompt) word
#: for word recites them instead of answering.
RECITE_CHARS = 40
#: How often (characters of new text) :class:`RunawayWatch` looks again.
WATCH_EVERY = 64
_LOOP = re.compile(rf"(.{{{LOOP_CHARS[0]},{LOOP_CHARS[1]}}}?)\1", re.DOTALL)


def repeats_itself(text: str) -> bool:
    """Some passage of :data:`LOOP_CHARS` characters comes twice in a row."""
    return _LOOP.search(text) is not None


def _spans(instructions: str) -> frozenset[str]:
    return frozenset(instructions[i:i + RECITE_CHARS] for i in range(len(instructions) - RECITE_CHARS + 1))


def _holds_span(text: str, spans: frozenset[str]) -> bool:
    return any(text[i:i + RECITE_CHARS] in spans for i in range(len(text) - RECITE_CHARS + 1))


def recites(text: str, instructions: str) -> bool:
    """``text`` holds :data:`RECITE_CHARS` characters of ``instructions`` word for word."""
    return _holds_span(text, _spans(instructions))


def runaway_problem(raw: str, previous: str, instructions: str) -> str | None:
    """Why a revision, as generated (``raw``, before :func:`parse_revision`), ran away (None: it did
    not): it repeats itself or recites its ``instructions`` where ``previous`` did not. Both only
    ever turn true as text is added, so a revision can be stopped the moment one does
    (:class:`RunawayWatch`) and the gate decides the same as if it had run to its end."""
    if repeats_itself(raw) and not repeats_itself(previous):
        return "repeats itself"
    if recites(raw, instructions) and not recites(previous, instructions):
        return "recites its instructions"
    return None


class RunawayWatch:
    """A revision pass's ``stop_when``: true once :func:`runaway_problem` holds for its text so far.

    Looks at the new text every :data:`WATCH_EVERY` characters, each time at its tail only (long
    enough to hold any loop or recital completed since the last look), so watching a 2,000-character
    revision costs a few milliseconds in all."""

    def __init__(self, previous: str, instructions: str) -> None:
        self._spans = _spans(instructions)
        self._watch_loops = not repeats_itself(previous)
        self._watch_recital = not _holds_span(previous, self._spans)
        self._seen = 0

    def __call__(self, text: str) -> bool:
        if len(text) - self._seen < WATCH_EVERY:
            return False
        start = max(0, self._seen - 2 * LOOP_CHARS[1])
        self._seen = len(text)
        tail = text[start:]
        if self._watch_loops and _LOOP.search(tail):
            return True
        return self._watch_recital and _holds_span(tail, self._spans)


def same_answer(a: str, b: str) -> bool:
    """The same words in the same order (case, spacing and punctuation aside)."""
    return _words(a) == _words(b)


def judge_instruction(system_prompts: Any) -> str:
    """What a verdict pass asks after the two answers (the ``judge`` entry of the system prompts,
    else :data:`FALLBACK_JUDGE_PROMPT`, then the question to answer with "A" or "B")."""
    judge = system_prompts.get(JUDGE_ROLE) if isinstance(system_prompts, dict) else None
    return (f"{(judge or FALLBACK_JUDGE_PROMPT).strip()}\n\nWhich answer is better: more correct, complete and "
            'clear? Reply with only a JSON object: {"better": "A"} or {"better": "B"}.')


def read_verdict(text: str) -> str | None:
    """"A", "B" or None from a judgement pass (JSON when constrained, else the first lone letter)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and value.get("better") in ("A", "B"):
        return str(value["better"])
    match = re.search(r"\b([AB])\b", text)
    return match.group(1) if match else None


def decide(stage: int, previous: str, candidate: str, problem: str | None, votes: tuple[bool | None, ...],
           policy: str) -> GateDecision:
    """The gate's decision for ``policy`` from the checks' ``problem`` and the judgement ``votes``."""
    def made(adopted: bool, reason: str) -> GateDecision:
        return GateDecision(stage, previous, candidate, adopted, reason, problem, votes)

    if not candidate.strip():
        return made(False, "Kept the previous answer: the revision is empty.")
    if policy == "none":
        return made(True, "Adopted the revision (no gate).")
    if problem is not None:
        return made(False, f"Kept the previous answer: the revision {problem}.")
    if same_answer(candidate, previous):
        return made(False, "Kept the previous answer: the revision repeats it.")
    if policy == "checks":
        return made(True, "Adopted the revision: it passed the checks.")
    wins = sum(1 for vote in votes if vote)
    if votes and wins == len(votes):
        return made(True, f"Adopted the revision: the model preferred it in both orders ({wins} of {len(votes)}).")
    return made(False, f"Kept the previous answer: the model preferred the revision in {wins} of "
                       f"{len(votes)} orders (it must win both).")
