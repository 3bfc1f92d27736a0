"""Passes: the sans-IO protocol between a chat turn and whatever runs its generations (no torch here).

A turn is a generator (:data:`Steps`). It yields the text the client sees (``str``) and the
generation passes it needs; its driver runs each pass and ``send`` s back the pass's full text.
A turn may also yield a tuple of passes that do not depend on each other: a driver that can run
them at once (the serving layer, whose engine batches them) does so, a sequential driver runs
them in order; either way it sends back their texts as a tuple, in the same order.

Two drivers exist: :func:`run_steps` here (synchronous, each pass through a :data:`GenerateFn`,
used by the in-process ``ConversationEngine``), and the serving layer's ``TurnStream`` (each
pass on the batching engine, from the event loop).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

#: Full messages (system first) -> the text chunks of ONE generation pass. A pass's options come
#: as keyword arguments (:func:`pass_options`: ``schema``, ``max_new_tokens``, ``do_sample``,
#: ``prediction``, ``stop``, ``repetition_penalty``); a function that does not name one (and takes
#: no ``**kwargs``) is not sent it.
#: With ``schema`` the pass must produce JSON valid against that schema.
GenerateFn = Callable[..., Iterator[str]]


@dataclass(frozen=True)
class Pass:
    """One generation pass a turn asks its driver for.

    ``messages`` are the pass's full chat messages (system first); ``schema``, when set, holds
    its output to that JSON schema; ``show`` streams its text to the client as it comes;
    ``name`` says which pass it is (``draft``, ``review1``, ``revision1``, ``judge1a``, ...;
    empty for a plain turn). ``max_new_tokens`` (None: the request's budget) caps a short pass;
    ``greedy`` asks for greedy decoding (a verdict is not sampled); ``prediction`` is the text the
    pass will likely repeat (a revision's previous answer), for prompt-lookup speculation;
    ``stop`` ends the pass at any of these strings (a revision that starts echoing its prompt);
    ``repetition_penalty`` (None: the request's) replaces the request's for this pass (a revision,
    whose prompt holds the answer it rewrites, is not pushed away from it). ``stop_when``, given the
    pass's text so far as it arrives, ends the pass once it returns True (a revision that has run
    away: see ``improvement_gate.RunawayWatch``); the text so far is then the pass's text.
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None = None
    show: bool = False
    name: str = ""
    max_new_tokens: int | None = None
    greedy: bool = False
    prediction: str | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    stop_when: Callable[[str], bool] | None = None


#: What a turn yields: text for the client, one pass, or independent passes to run together.
Step = str | Pass | tuple[Pass, ...]
#: What a driver sends back: a pass's full text, or the texts of passes run together (in order).
Sent = str | tuple[str, ...]
#: A turn as a sans-IO generator; it returns the turn's result (the spec's ``last_result`` keys).
Steps = Generator[Step, Sent, dict[str, str]]


@dataclass(frozen=True)
class Advance:
    """What a turn needs next: ``texts`` to show, then ``passes`` to run (empty: finished)."""

    texts: list[str]
    passes: tuple[Pass, ...]
    result: dict[str, str]

    @property
    def next_pass(self) -> Pass | None:
        """The (first) pass to run next; None when the turn has finished."""
        return self.passes[0] if self.passes else None

    def reply(self, texts: tuple[str, ...]) -> Sent:
        """What to send the turn once ``passes`` ran and gave ``texts``: one text for one pass."""
        return texts if len(self.passes) != 1 else texts[0]


def advance(steps: Steps, sent: Sent | None = None) -> Advance:
    """Run ``steps`` (sending it the text(s) of the pass(es) just run, if any) up to its next pass(es)."""
    texts: list[str] = []
    try:
        step = next(steps) if sent is None else steps.send(sent)
        while isinstance(step, str):
            texts.append(step)
            step = next(steps)
    except StopIteration as stop:
        return Advance(texts, (), stop.value)
    return Advance(texts, step if isinstance(step, tuple) else (step,), {})


def ask(one: Pass) -> Generator[Pass, Sent, str]:
    """Yield one pass and return its text (for turns that need exactly one text back)."""
    text = yield one
    assert isinstance(text, str), "a single pass is answered with its text"
    return text


def run_steps(steps: Steps, generate: GenerateFn) -> Generator[str, None, dict[str, str]]:
    """The synchronous driver: each pass through ``generate`` (passes run together: in order);
    yields the client's text; returns the turn's result."""
    step = advance(steps)
    while True:
        yield from step.texts
        if not step.passes:
            return step.result
        texts: list[str] = []
        for one in step.passes:
            texts.append((yield from _run_pass(generate, one)))
        step = advance(steps, step.reply(tuple(texts)))


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
    if one.stop:
        options["stop"] = one.stop
    if one.repetition_penalty is not None:
        options["repetition_penalty"] = one.repetition_penalty
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
    """Yield a pass's chunks when it is shown; return its full text (up to where ``stop_when`` ended it:
    closing the generator stops the generation)."""
    parts: list[str] = []
    chunks = generate(one.messages, **_accepted(generate, pass_options(one)))
    try:
        for chunk in chunks:
            if chunk:
                parts.append(chunk)
                if one.show:
                    yield chunk
                if one.stop_when is not None and one.stop_when("".join(parts)):
                    break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return "".join(parts)


__all__ = ["Advance", "GenerateFn", "Pass", "Sent", "Step", "Steps", "advance", "ask", "pass_options", "run_steps"]
