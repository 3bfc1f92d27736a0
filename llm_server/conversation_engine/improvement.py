"""Answer improvement: draft -> review 1 -> revision 1 -> review 2 -> revision 2 (no torch here).

The stage logic is sans-IO: :func:`improvement_steps` is a generator that yields the text the
client sees and each :class:`Pass` it needs (messages, optional JSON schema), and is sent back
each pass's full text. Two drivers run it: :func:`improvement_pipeline` here (synchronous, each
pass through a ``generate`` function: full chat messages -> text chunks of one pass), used by
the in-process ``ConversationEngine``; and the serving layer's ``TurnStream``, which runs each
pass on the batching engine from the event loop (no thread of its own). The reviser
writes three sections ("Suggestions:", "Revised answer:", "Comments:"); :func:`parse_review`
reads them tolerantly, and a revision that is missing, empty or "None" falls back to the
previous answer.

Streaming: without intermediate steps only the final answer is yielded. With intermediate steps
each stage is preceded by one of :data:`STAGE_HEADINGS` and a blank line, and followed by a
blank line; draft and reviews stream live, revisions are yielded once parsed.

Structured reviews (``structured=True``, used when the grammar library is installed and the
``generate`` function accepts ``schema=``): each review pass is constrained to
:data:`REVIEW_SCHEMA` (suggestions, revised answer, comments as JSON), so even a 135M model's
output always parses; the intermediate-steps stream then shows the parsed sections rather
than raw JSON. A review cut short by max_new_tokens falls back to the text parser.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from llm_server.conversation_engine.inputs import (
    DEFAULT_ROLE,
    SystemPrompt,
    build_messages,
    build_review_messages,
)

#: Full messages (system first) -> the text chunks of ONE generation pass. With structured
#: reviews it is also called as ``generate(messages, schema=...)``: the pass must then produce
#: JSON valid against that schema.
GenerateFn = Callable[..., Iterator[str]]

#: The JSON a structured review pass is constrained to (lengths bound a small model's loops).
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "suggestions": {"type": "string", "maxLength": 300},
        "revised_answer": {"type": "string", "minLength": 1, "maxLength": 1000},
        "comments": {"type": "string", "maxLength": 200},
    },
    "required": ["suggestions", "revised_answer", "comments"],
    "additionalProperties": False,
}
_JSON_INSTRUCTION = (
    "\n\nReply with only a JSON object with three string fields: \"suggestions\" (the improvements), "
    "\"revised_answer\" (the complete improved answer) and \"comments\" (one sentence on what changed)."
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

_SECTION_NAMES = {
    "suggested improvements": "suggestions",
    "improvement suggestions": "suggestions",
    "suggestions": "suggestions",
    "suggestion": "suggestions",
    "improvements": "suggestions",
    "feedback": "suggestions",
    "revised answer": "revision",
    "revised response": "revision",
    "revised draft": "revision",
    "improved answer": "revision",
    "improved response": "revision",
    "improved version": "revision",
    "revised version": "revision",
    "improved draft": "revision",
    "rewritten answer": "revision",
    "rewritten version": "revision",
    "refined answer": "revision",
    "refined response": "revision",
    "refined version": "revision",
    "updated answer": "revision",
    "final answer": "revision",
    "revision": "revision",
    "comments": "comments",
    "comment": "comments",
    "notes": "comments",
    "changes made": "comments",
}
_NAMES_PATTERN = "|".join(re.escape(name) for name in sorted(_SECTION_NAMES, key=len, reverse=True))
_HEADER = re.compile(
    r"^[ \t]*(?P<hashes>#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(?P<name>" + _NAMES_PATTERN + r")"
    r"[ \t]*(?:\*\*|__)?[ \t]*(?P<colon>:)?[ \t]*(?:\*\*|__)?[ \t]*(?P<rest>.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_NO_REVISION = re.compile(
    r"^\W*(none|null|n/?a|nothing|no changes?( needed| required)?|same as (the )?draft)\W*$", re.IGNORECASE
)
#: A line that only echoes a template placeholder, e.g. "<the complete improved answer>" or "[improved version]".
_PLACEHOLDER_LINE = re.compile(r"^[ \t]*(<[^<>\n]*>|\[[^\[\]\n]*\])[ \t]*$\n?", re.MULTILINE)


@dataclass(frozen=True)
class Review:
    """One parsed reviser output. ``revision_found`` is False when the fallback was used."""

    suggestions: str
    revision: str
    comments: str
    revision_found: bool


def _is_header(match: re.Match[str]) -> bool:
    """A section name counts as a header with a colon, a markdown '#', or alone on its line."""
    return bool(match.group("colon") or match.group("hashes") or not match.group("rest").strip())


def split_sections(text: str) -> dict[str, str]:
    """Section kind ("suggestions" / "revision" / "comments") -> its text (first non-empty one)."""
    headers = [m for m in _HEADER.finditer(text) if _is_header(m)]
    sections: dict[str, str] = {}
    for index, match in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        body = (match.group("rest") + text[match.end() : end]).strip()
        kind = _SECTION_NAMES[match.group("name").lower()]
        if body and not sections.get(kind):
            sections[kind] = body
    return sections


def _clean_revision(text: str) -> str:
    """Strip whitespace, wrapping quotes and placeholder lines; '' when no real answer is left."""
    revision = _PLACEHOLDER_LINE.sub("", text).strip()
    if len(revision) >= 2 and revision[0] == revision[-1] and revision[0] in "\"'":
        revision = revision[1:-1].strip()
    if _NO_REVISION.match(revision):
        return ""
    return revision


def parse_review(text: str, previous_answer: str) -> Review:
    """Read the reviser's output; a missing/empty/"None" revision falls back to ``previous_answer``.

    Output that follows no recognisable format is kept whole as the suggestions.
    """
    sections = split_sections(text)
    if not sections:
        return Review(text.strip(), previous_answer, "", revision_found=False)
    revision = _clean_revision(sections.get("revision", ""))
    return Review(
        suggestions=sections.get("suggestions", ""),
        revision=revision or previous_answer,
        comments=sections.get("comments", ""),
        revision_found=bool(revision),
    )


def grammar_available() -> bool:
    """Whether structured reviews can run (the optional grammar library is installed)."""
    return importlib.util.find_spec("llguidance") is not None


def structured_review_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Review messages asking for :data:`REVIEW_SCHEMA`'s JSON instead of text sections."""
    last = messages[-1]
    return [*messages[:-1], {**last, "content": last["content"] + _JSON_INSTRUCTION}]


_FIELD_START = re.compile(r'"(suggestions|revised_answer|comments)": ?(?=")')


def _complete_fields(text: str) -> dict[str, str]:
    """The string fields of a JSON object cut short (by max_new_tokens) that were completed."""
    fields: dict[str, str] = {}
    decoder = json.JSONDecoder()
    for match in _FIELD_START.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, match.end())
        except ValueError:
            continue
        if isinstance(value, str):
            fields[match.group(1)] = value
    return fields


def parse_structured_review(text: str, previous_answer: str) -> Review:
    """A structured review's JSON -> Review. A document cut short by max_new_tokens keeps the
    fields it completed; text that is not that JSON at all goes to :func:`parse_review`."""
    try:
        value = json.loads(text)
    except ValueError:
        value = _complete_fields(text) if text.lstrip().startswith("{") else None
    if not isinstance(value, dict) or not value:
        return parse_review(text, previous_answer)
    revision = _clean_revision(str(value.get("revised_answer") or ""))
    return Review(
        suggestions=str(value.get("suggestions") or "").strip(),
        revision=revision or previous_answer,
        comments=str(value.get("comments") or "").strip(),
        revision_found=bool(revision),
    )


def _review_text(review: Review) -> str:
    """A structured review as the intermediate-steps stream shows it."""
    return f"Suggestions: {review.suggestions}\n\nComments: {review.comments}"


@dataclass(frozen=True)
class Pass:
    """One generation pass the pipeline asks its driver for.

    ``messages`` are the pass's full chat messages (system first); ``schema``, when set, holds
    its output to that JSON schema; ``show`` streams its text to the client as it comes;
    ``name`` says which pass it is (``draft``, ``review1``, ``review2``; empty for a plain turn).
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None = None
    show: bool = False
    name: str = ""


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


def _run_pass(generate: GenerateFn, one: Pass) -> Generator[str, None, str]:
    """Yield a pass's chunks when it is shown; return its full text."""
    chunks = generate(one.messages) if one.schema is None else generate(one.messages, schema=one.schema)
    parts: list[str] = []
    for chunk in chunks:
        if chunk:
            parts.append(chunk)
            if one.show:
                yield chunk
    return "".join(parts)


def _stage(one: Pass, heading: str | None) -> Generator[str | Pass, str, str]:
    """A pass under ``heading`` (when visible), followed by a blank line; returns its text."""
    if heading is not None:
        yield f"{heading}\n\n"
    text = yield one
    if heading is not None:
        yield "\n\n"
    return text


def _review(
    messages: list[dict[str, str]], previous: str, heading: str | None, structured: bool, name: str
) -> Generator[str | Pass, str, Review]:
    """One review pass (streamed under ``heading`` when visible); returns its parsed Review."""
    if not structured:
        text = yield from _stage(Pass(messages, show=heading is not None, name=name), heading)
        return parse_review(text, previous)
    text = yield Pass(structured_review_messages(messages), schema=REVIEW_SCHEMA, name=name)
    review = parse_structured_review(text, previous)
    if heading is not None:
        yield f"{heading}\n\n{_review_text(review)}\n\n"
    return review


def improvement_steps(
    system_prompts: SystemPrompt,
    history: list[dict[str, str]],
    message: str,
    role: str = DEFAULT_ROLE,
    intermediate_steps: bool = False,
    result: dict[str, str] | None = None,
    structured: bool = False,
    reviews: list[Review] | None = None,
) -> Steps:
    """Draft -> review 1 -> revision 1 -> review 2 -> revision 2, as :data:`Steps`.

    Yields the chunks the client's stream carries and the three passes (``draft``,
    ``review1``, ``review2``); fills ``result`` (cleared first) with draft_answer,
    suggestions1, revision1, comments1, suggestions2, revision2, comments2 and reply
    (== the final answer), stage by stage, and returns it. The draft is the first pass, with
    messages ``build_messages(system_prompts, message, role, history)``. ``structured``
    constrains the review passes to :data:`REVIEW_SCHEMA`; ``reviews`` (when given) receives
    both parsed reviews (to measure parse fallbacks).
    """
    result = result if result is not None else {}
    result.clear()
    show = intermediate_steps
    draft_pass = Pass(build_messages(system_prompts, message, role, history), show=show, name="draft")
    draft = (yield from _stage(draft_pass, DRAFT_HEADING if show else None)).strip()
    result["draft_answer"] = draft

    review1 = yield from _review(build_review_messages(system_prompts, message, draft, history), draft,
                                 REVIEW1_HEADING if show else None, structured, "review1")
    result.update(suggestions1=review1.suggestions, revision1=review1.revision, comments1=review1.comments)
    if show:
        yield f"{REVISION1_HEADING}\n\n{review1.revision}\n\n"

    review2 = yield from _review(build_review_messages(system_prompts, message, review1.revision, history),
                                 review1.revision, REVIEW2_HEADING if show else None, structured, "review2")
    if reviews is not None:
        reviews.extend((review1, review2))
    result.update(suggestions2=review2.suggestions, revision2=review2.revision, comments2=review2.comments)
    result["reply"] = review2.revision
    yield f"{FINAL_HEADING}\n\n{review2.revision}\n\n" if show else review2.revision
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
    reviews: list[Review] | None = None,
) -> Iterator[str]:
    """:func:`improvement_steps` driven synchronously, each pass through ``generate``.

    Yields the chunks the client's stream carries and fills ``result`` as
    :func:`improvement_steps` does (the Python API's ``last_result``).
    """
    steps = improvement_steps(system_prompts, history, message, role, intermediate_steps, result, structured,
                              reviews)
    yield from run_steps(steps, generate)
