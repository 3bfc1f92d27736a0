"""Structured output for the serving layer: ``response_format`` -> a grammar on the sampling
settings, and recorded log-probabilities -> :class:`TokenText` (token text and alternatives), which
each protocol adapter writes in its own shape.

The grammar library (and torch with it) is imported lazily, when a request first asks for
structure, so the API package can be imported without torch. Compiling happens here, in the
request's worker thread, never on the engine's scheduler thread; a schema the library cannot
compile, or one no finite document satisfies (:mod:`llm_server.serving.schema_check`), is a
:class:`~llm_server.serving.request.ChatInputError` (HTTP 400) naming the problem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from llm_server.engine.types import LogprobLog, SamplingParams, TokenLogprob
from llm_server.serving.request import ChatInputError
from llm_server.serving.schema_check import uninhabited_reason

logger = logging.getLogger(__name__)

#: The most alternatives a request may ask for per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


def response_format_grammar(tokenizer: Any, response_format: Any, param: str = "response_format") -> Any:
    """The grammar for an OpenAI ``response_format`` (None for text); ChatInputError when invalid."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ChatInputError(f"{param} must be an object", param=param, code="invalid_response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return compile_schema(tokenizer, None, param)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ChatInputError(f"{param}.json_schema.schema is required", param=f"{param}.json_schema",
                                 code="invalid_response_format")
        return compile_schema(tokenizer, spec["schema"], f"{param}.json_schema.schema")
    raise ChatInputError(f"{param}.type must be text, json_object or json_schema, not {kind!r}",
                         param=f"{param}.type", code="invalid_response_format")


def compile_schema(tokenizer: Any, schema: Any, param: str) -> Any:
    """A JSON schema compiled for ``tokenizer`` (None: json_object mode's bounded object);
    ChatInputError naming the problem otherwise."""
    try:
        from llm_server.engine.constraints import GrammarError, compiler_for
    except ImportError as exc:  # the optional extra is not installed
        raise ChatInputError(f"{param}: structured output needs the grammar extra "
                             "(pip install 'llm_server[grammar]')", param=param, code="unsupported_value") from exc
    if schema is not None and (reason := uninhabited_reason(schema)) is not None:
        raise ChatInputError(f"{param}: {reason}", param=param, code="invalid_schema")
    try:
        compiler = compiler_for(tokenizer)
        return compiler.json_object() if schema is None else compiler.json_schema(schema)
    except GrammarError as exc:
        raise ChatInputError(f"{param} cannot be compiled: {exc}", param=param, code="invalid_schema") from exc


def constrained(params: SamplingParams, grammar: Any) -> SamplingParams:
    """``params`` with ``grammar`` enforced (unchanged for None)."""
    return params if grammar is None else replace(params, constraint=grammar)


def with_logprobs(params: SamplingParams, top: int | None) -> tuple[SamplingParams, LogprobLog | None]:
    """``params`` recording log-probabilities (``top`` alternatives per token; None: off)."""
    if top is None:
        return params, None
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ChatInputError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    log = LogprobLog()
    return replace(params, logprobs=top, logprob_sink=log), log


@dataclass(frozen=True)
class TokenText:
    """One generated token's text and log-probability, with its likeliest alternatives."""

    token: str
    logprob: float | None  # None: the prompt's first token (nothing before it predicts it)
    top: tuple[tuple[str, float], ...]


class LogprobReader:
    """Reads a turn's recorded :class:`TokenLogprob` as :class:`TokenText` (special tokens left out)."""

    def __init__(self, tokenizer: Any, log: LogprobLog) -> None:
        self._tokenizer = tokenizer
        self._log = log
        self._special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])

    def _text(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id]))

    def take(self) -> list[TokenText]:
        """What was recorded since the last call."""
        return [self._item(item) for item in self._log.drain() if item.token_id not in self._special]

    def take_prompt(self) -> list[TokenText] | None:
        """The prompt's tokens and log-probabilities (the first: None); None until the engine recorded them."""
        items = self._log.prompt()
        return None if items is None else [self._item(i) for i in items if i.token_id not in self._special]

    def _item(self, item: TokenLogprob) -> TokenText:
        top = tuple((self._text(i), lp) for i, lp in item.top)
        return TokenText(self._text(item.token_id), item.logprob, top)
