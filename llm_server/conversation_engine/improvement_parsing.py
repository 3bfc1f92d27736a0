"""Reading the improvement passes' output (no torch): review sections, suggestions, revisions.

A reviser may write sections ("Suggestions:", "Revised answer:", "Comments:" and many variants);
:func:`split_sections` finds them tolerantly and :func:`parse_review` reads a whole review (a
missing, empty or "None" revision falls back to the previous answer). The pipeline reads a
review pass with :func:`parse_suggestions` (the JSON list of a structured review, or the text's
"Suggestions:" section) and a revision pass with :func:`parse_revision` (the answer alone).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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


def numbered(items: list[str]) -> str:
    """``["a", "b"]`` -> ``"1. a\\n2. b"`` (blank items dropped)."""
    kept = [" ".join(item.split()) for item in items if item.strip()]
    return "\n".join(f"{index}. {item}" for index, item in enumerate(kept, 1))


_ITEM = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_suggestions(text: str, structured: bool) -> str:
    """A review pass's text -> its numbered suggestions.

    Structured: the JSON's list (a document cut short by max_new_tokens keeps the items it
    completed). Text: the "Suggestions:" section, or the whole text when it has no sections.
    """
    if structured and text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
            items = value.get("suggestions") if isinstance(value, dict) else None
        except ValueError:
            items = [json.loads(f'"{m.group(1)}"') for m in _ITEM.finditer(text) if m.group(1) != "suggestions"]
        if isinstance(items, list) and any(isinstance(i, str) and i.strip() for i in items):
            return numbered([i for i in items if isinstance(i, str)])
    return parse_review(text, "").suggestions


#: Where a revision pass stops: the labels of its own prompt, which a small model echoes after the answer.
REVISION_STOPS = ("\n\nRewrite answer A", "\n\nSuggestions:", "\n\nQuestion:", "\n\nAnswer A:", "\n\nAnswer B:")

_LEAD_IN = re.compile(r"^[ \t]*(here is|here's|below is)\b[^\n]*:[ \t]*\n", re.IGNORECASE)


#: A paragraph about the changes rather than the answer ("Removed ...", "This response was rewritten ...").
_CHANGE_NOTE = re.compile(
    r"^\W*(removed|added|changed|corrected|improved|revised|rewrote|updated|no (additional |other |further )?changes"
    r"|this (response|revision|revised (answer|version)|version|rewrite)\b|i (have |)(made|added|removed|changed)"
    r"|note:)"
    r"|\b(original|previous|draft) answer\b|\bsuggested (edits|changes|improvements)\b|\bthe suggestions\b",
    re.IGNORECASE,
)


def parse_revision(text: str) -> str:
    """A revision pass's text -> the candidate answer: its "Revised answer:" section when it wrote
    one, without a lead-in line ("Here is the improved answer:"), trailing paragraphs about the
    changes, wrapping quotes or placeholders; nothing from an echo of its prompt on (:data:`REVISION_STOPS`:
    the engine stops there, ``model.generate`` keeps the stop string)."""
    for stop in REVISION_STOPS:
        text = text.split(stop, 1)[0]
    body = _LEAD_IN.sub("", (split_sections(text).get("revision") or text).strip(), count=1)
    paragraphs = re.split(r"\n\s*\n", body)
    while len(paragraphs) > 1 and _CHANGE_NOTE.search(paragraphs[-1]):
        paragraphs.pop()
    return _clean_revision("\n\n".join(paragraphs))
